"""Hugging Face transformers models (tiny configs, random weights, no downloads) through trace, match,
rewrite and fold: causal LMs with their default config (use_cache on), tied parameters reported, trained
as one tensor and folded once, shipped rule files on models without a classifier, LoRA's fallback on a
model whose attention the matcher misses, and which rule placed each tuner.

Truth from outside the code: the eager Hugging Face model (its logits, its own tied parameters, its
config's sizes), with LoRA merged into its weights by the closed form W + s B A."""

import json
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import utune_fx  # noqa: F401  (first: transformers imports torchvision, see utune_fx/_compat.py)

# isort: split
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.pytorch_utils import Conv1D

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.fold.artifact import FOLDED_TENSORS, fold_artifact, load_folded, save_folded
from utune_fx.match import load_rules, match_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite.artifact import TunedSource, build_tuned, save_tuned
from utune_fx.trace import trace, trace_report

VOCAB, TOKENS = 100, 8
LOGITS_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32: the traced graph runs the same kernels as eager
FOLD_TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32: merged weights round differently from the branch
MOVED = 1e-3  # the tuners, moved from identity, change the logits by at least this much

# The builders the command line and the artifacts name (a code spec: path.py:callable)
BUILDERS = textwrap.dedent(
    """
    import torch
    import utune_fx  # noqa: F401
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertModel, GPT2Config,
                              GPT2LMHeadModel, GPT2Model)

    def gpt2(head=False):
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
        return (GPT2LMHeadModel if head else GPT2Model)(config).eval()

    def bert():
        torch.manual_seed(0)
        config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=100, max_position_embeddings=64)
        return BertModel(config, add_pooling_layer=False).eval()

    def bart():
        torch.manual_seed(0)
        config = BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                            max_position_embeddings=64)
        return BartForConditionalGeneration(config).eval()
    """
)
IDS = ["--input-shape", f"2,{TOKENS}:int64"]


@pytest.fixture(scope="module")
def builders(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "hf_models.py"
    path.write_text(BUILDERS)
    return path


def _ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(seed))


def _gpt2_lm() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=32)).eval()


def _llama_lm() -> nn.Module:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


# -- causal LMs trace with their default config -------------------------------------------------


@pytest.mark.parametrize("build", [_gpt2_lm, _llama_lm], ids=["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_causal_lms_trace_with_their_default_config_and_compute_the_eager_logits(build):
    model = build()
    assert model.config.use_cache is True  # the default: eager calls return a KV cache
    with torch.no_grad():
        assert isinstance(model(_ids()).past_key_values, DynamicCache)
    gm = trace(model, (_ids(seed=0),))  # the auto front end
    report = trace_report(gm)
    assert report.frontend == "export"
    assert report.settings == [
        f"{type(model.config).__name__}.use_cache=False (restored after tracing: the graph returns no KV cache)"
    ]
    assert model.config.use_cache is True  # restored
    ids = _ids(seed=2)  # not the ids it was traced with
    with torch.no_grad():
        expected, traced = model(ids).logits, gm(ids).logits
    assert traced.shape == (2, TOKENS, VOCAB)
    torch.testing.assert_close(traced, expected, **LOGITS_TOL)


class _ReturnsCache(nn.Module):
    """Returns its KV cache whatever its config says (no config at all)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        cache = DynamicCache()
        keys = self.proj(x).unsqueeze(1)
        cache.update(keys, keys, 0)
        return keys, cache


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_model_that_returns_its_cache_fails_with_the_fix_named(frontend):
    with pytest.raises(UtuneError) as error:
        trace(_ReturnsCache().eval(), torch.randn(2, 5, 8), frontend=frontend)
    message = str(error.value)
    assert "returns a DynamicCache" in message and message.endswith(
        "call the model with use_cache=False (or set it in its config): fine-tuning needs no DynamicCache"
    )
    assert "\n" not in message and "register a pytree" not in message


# -- tied parameters ----------------------------------------------------------------------------


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The model's own account: names that are one tensor."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


# The prelude's head leaves a language model's token head frozen (as PEFT does); these rules train it
# on purpose, to test what training a head tied to the token embedding does.
LM_HEAD_RULES = """version: 1
patterns:
  attention_linear: {node: {kind: [linear, conv]}, within: attention}
  lm_head: {node: {kind: linear, feeds_output: true}}
rules:
  - {name: lora, match: attention_linear, tuner: lora, settings: {rank: 8, alpha: 16}}
  - {name: classifier, match: lm_head, tuner: head}
"""


@pytest.fixture
def lm_head_rules(tmp_path) -> Path:
    path = tmp_path / "lora_lm_head.yaml"
    path.write_text(LM_HEAD_RULES)
    return path


@pytest.fixture
def lm_head_probe(tmp_path) -> Path:
    path = tmp_path / "lm_head_probe.yaml"
    path.write_text(
        LM_HEAD_RULES.replace(
            "  - {name: lora, match: attention_linear, tuner: lora, settings: {rank: 8, alpha: 16}}\n", ""
        )
    )
    return path


def _tuned(builders: Path, spec: str, rules: str, out: Path):
    """Rewrite, move every trainable tensor away from where it started (tuners away from identity, the
    trained existing weights changed as training would), save the artifact."""
    source = TunedSource(f"{builders}:{spec}", [IDS[1]], "auto")
    rule_sets = [load_rules(rules)]
    result = build_tuned(source, rule_sets)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    save_tuned(result, rule_sets, source, out)
    return result


def _fresh(path: Path, name: str, **options) -> nn.Module:
    """A new model, built as the spec path.py:name builds it (its own tensors: a tuned graph shares the
    traced model's)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{path.stem}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)(**options)


def _eager_reference(base: nn.Module, result) -> nn.Module:
    """The Hugging Face model itself with the tuned tensors: every trained existing tensor copied by name
    (a tied one reaches all its names through the model's own tie), every LoRA merged as W + s B A (a
    Conv1D stores W transposed)."""
    trained = {n: p for n, p in result.module.named_parameters() if p.requires_grad and not n.startswith("utune.")}
    with torch.no_grad():
        for name, tensor in trained.items():
            base.get_parameter(name).copy_(tensor)
        for summary in (s for s in result.summaries if s.tuner == "lora"):
            for index, scope in enumerate(summary.scopes):
                branch = result.module.get_submodule(f"utune.{summary.rule}.{index}")
                delta = branch.scaling * branch.lora_B.weight @ branch.lora_A.weight  # [out, in]
                layer = base.get_submodule(scope)
                layer.weight.add_(delta.T if isinstance(layer, Conv1D) else delta)
    return base


def test_gpt2_head_rule_trains_the_tied_embedding_and_says_so_and_fold_keeps_one_tensor(
    builders, tmp_path, capsys, lm_head_rules
):
    tuned_dir, folded_dir = tmp_path / "tuned", tmp_path / "folded"
    result = _tuned(builders, "gpt2?head=true", str(lm_head_rules), tuned_dir)
    eager = result.base_model
    assert _tied_names(eager) == [["transformer.wte.weight", "lm_head.weight"]]
    config = eager.config
    # the head rule's trainable set, named: the classifier and the embedding it is tied to
    classifier = next(s for s in result.summaries if s.rule == "classifier")
    assert classifier.tied == [["lm_head.weight", "transformer.wte.weight"]]
    assert classifier.trained_parameters == config.vocab_size * config.n_embd  # one tensor, counted once
    module = result.module
    assert module.get_parameter("transformer.wte.weight").requires_grad
    lora = config.n_layer * 8 * ((config.n_embd + 3 * config.n_embd) + (config.n_embd + config.n_embd))  # rank 8
    assert result.trainable_parameters == lora + config.vocab_size * config.n_embd
    # the report says so, and does not claim the embedding frozen
    from rich.console import Console

    from utune_fx.rewrite.report import render_rewrite

    render_rewrite(result, "gpt2", Console(width=200))
    out = capsys.readouterr().out
    assert (
        "classifier trains lm_head.weight, which is tied to transformer.wte.weight (one tensor): it trains them all"
        in out
    )
    assert "everything else frozen (the tied names above train too)" in out
    # the tuned graph computes what the Hugging Face model computes with those tensors
    reference = _eager_reference(_fresh(builders, "gpt2", head=True), result)
    ids = _ids(seed=4)
    with torch.no_grad():
        expected = reference(ids).logits
        tuned = module(ids).logits
        untouched = _fresh(builders, "gpt2", head=True)(ids).logits
    torch.testing.assert_close(tuned, expected, **FOLD_TOL)
    assert (tuned - untouched).abs().max() > MOVED  # the tuners and the head really moved
    # fold: the tied tensor is written once and stays one tensor
    tuned_result, folded, difference = fold_artifact(tuned_dir, model=f"{builders}:gpt2?head=true")
    save_folded(tuned_dir, folded, difference, folded_dir)
    written = safetensors.torch.load_file(str(folded_dir / FOLDED_TENSORS))
    embedding = [name for name, t in written.items() if t.shape == (config.vocab_size, config.n_embd)]
    assert embedding == ["transformer.wte.weight"]
    _, reloaded = load_folded(folded_dir, model=f"{builders}:gpt2?head=true")
    head, wte = reloaded.module.get_parameter("lm_head.weight"), reloaded.module.get_parameter("transformer.wte.weight")
    assert head is wte
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(ids).logits, expected, **FOLD_TOL)


def test_match_names_the_tied_tensors_a_head_rule_trains(builders, capsys, lm_head_probe):
    model = f"{builders}:gpt2?head=true"
    assert main(["match", model, "--rules", str(lm_head_probe), *IDS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (classifier,) = report["results"]
    assert classifier["tied"] == [["lm_head.weight", "transformer.wte.weight"]]
    assert classifier["trained_parameters"] == 100 * 64  # vocab_size x n_embd, the one tensor once
    assert classifier["where"].startswith(str(load_rules(lm_head_probe).path) + ":")  # the rule, by file and line
    assert main(["match", model, "--rules", str(lm_head_probe), *IDS]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "also trains transformer.wte.weight: tied to lm_head.weight (one tensor)" in out


def test_bart_folds_its_shared_embedding_once(builders, tmp_path):
    tuned_dir, folded_dir = tmp_path / "tuned", tmp_path / "folded"
    result = _tuned(builders, "bart", "lora", tuned_dir)
    eager, config = result.base_model, result.base_model.config
    shared = [
        "model.shared.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "lm_head.weight",
    ]
    assert _tied_names(eager) == [shared]  # the model's own ties: four names, one tensor
    _, folded, difference = fold_artifact(tuned_dir, model=f"{builders}:bart")
    save_folded(tuned_dir, folded, difference, folded_dir)
    written = safetensors.torch.load_file(str(folded_dir / FOLDED_TENSORS))
    assert [name for name, t in written.items() if t.shape == (config.vocab_size, config.d_model)] == [shared[0]]
    _, reloaded = load_folded(folded_dir, model=f"{builders}:bart")
    assert len({id(reloaded.module.get_parameter(name)) for name in shared}) == 1  # still tied
    reference = _eager_reference(_fresh(builders, "bart"), result)
    ids = _ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(ids).logits, reference(ids).logits, **FOLD_TOL)


class _TiedLM(nn.Module):
    """Embedding and classifier share their weight; torch.fx keeps both as modules."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.body(self.embed(ids))))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_a_tied_classifier_is_kept_as_a_branch_not_folded_into_the_embedding(tmp_path, frontend):
    from utune_fx.fold import fold
    from utune_fx.rewrite import rewrite

    rules = tmp_path / "head_lora.yaml"
    rules.write_text(
        "version: 1\npatterns:\n  out: {node: {kind: linear, feeds_output: true}}\n"
        "rules:\n  - {name: head_lora, match: out, tuner: lora, settings: {rank: 2}}\n"
    )
    model, ids = _TiedLM().eval(), torch.randint(0, 50, (2, 6))
    result = rewrite(trace(model, ids, frontend=frontend), load_rules(rules))
    with torch.no_grad():
        for name, parameter in result.module.named_parameters():
            if name.startswith("utune."):
                parameter.add_(0.1 * torch.randn_like(parameter))
        branch = result.module.get_submodule("utune.head_lora.0")
        # eager truth: the embedding reads W, the classifier W + s B A
        hidden = torch.relu(model.body(model.embed(ids)))
        expected = hidden @ (model.lm_head.weight + branch.scaling * branch.lora_B.weight @ branch.lora_A.weight).T
        folded = fold(result.module, result.summaries)
        torch.testing.assert_close(folded.module(ids), expected, **FOLD_TOL)
    assert [entry.status for entry in folded.entries] == ["kept"]


# -- shipped rule files on models without a classifier -------------------------------------------


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "spec,rules,code",
    [
        ("gpt2", "lora", 0),  # the file's other rules tune the backbone: its head rule is a note
        ("gpt2", "utuner_block", 0),
        ("bert", "adapter", 0),
        ("gpt2", "linear_probe", 3),  # the head rule is all the file has: nothing would train
    ],
)
def test_shipped_rule_files_on_models_without_a_classifier(builders, tmp_path, capsys, spec, rules, code):
    model = f"{builders}:{spec}"
    match_code, match_out, match_err = _cli(capsys, "match", model, "--rules", rules, *IDS)
    rewrite_code, rewrite_out, rewrite_err = _cli(
        capsys, "rewrite", model, "--rules", rules, *IDS, "-o", tmp_path / "t"
    )
    assert match_code == rewrite_code == code, (match_err, rewrite_err)
    assert match_err == rewrite_err  # the same line, or none
    if code == 3:
        assert "rule(s) classifier in" in match_err and not (tmp_path / "t").exists()
        return
    note = "skipped: the model has no classifier (pattern 'head' finds nothing in it)"
    assert note in " ".join(match_out.split()) and note in " ".join(rewrite_out.split())
    main(["match", model, "--rules", rules, *IDS, "--json"])
    report = json.loads(capsys.readouterr().out)
    classifier = next(entry for entry in report["results"] if entry["rule"] == "classifier")
    assert classifier["regions"] == [] and classifier["standby"].startswith("skipped: the model has no classifier")
    assert report["empty_rules"] == []


def test_lora_on_gpt2_without_a_head_trains_only_the_attention_projections(builders, tmp_path, capsys):
    """What the rewrite trains, against the config's sizes: rank 8 on c_attn (d -> 3d) and c_proj (d -> d)."""
    model = f"{builders}:gpt2"
    assert main(["rewrite", model, "--rules", "lora", *IDS, "-o", str(tmp_path / "t")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    d, layers = 64, 2
    assert sum(torch.Size(shape).numel() for shape in manifest["tensors"].values()) == layers * 8 * (4 * d + 2 * d)
    assert all(name.startswith("utune.lora.") for name in manifest["tensors"])
    # which rule placed each tuner: the rule, its file and line, and the sites
    (lora,) = [s for s in manifest["summary"] if s["rule"] == "lora"]
    assert lora["where"].startswith(str(load_rules("lora").path) + ":")
    assert (
        "lora places utune.lora.{0..3} at h.{0,1}.attn.c_attn, h.{0,1}.attn.c_proj" in out
        or "lora places utune.lora.{0..3} at h.{0,1}.attn.c_proj, h.{0,1}.attn.c_attn" in out
    ), out
    assert lora["where"] in out


# -- LoRA's fallback never tunes a model with attention ------------------------------------------


# Attention with its softmax written as exp / sum, and no residual: the matcher finds no attention
HIDDEN_ATTENTION = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Hidden(nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.embed, self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(4))
            self.head = nn.Linear(dim, 4)

        def forward(self, x):
            h = self.embed(x)
            scores = self.q(h) @ self.k(h).transpose(-2, -1) / 4.0
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            return self.head(((weights / weights.sum(-1, keepdim=True)) @ self.v(h)).mean(1))
    """
)


@pytest.fixture
def hidden_attention(tmp_path) -> Path:
    path = tmp_path / "hidden.py"
    path.write_text(HIDDEN_ATTENTION)
    return path


class _OpaqueAttention(nn.Module):
    """Attention torch.fx cannot trace (a branch on a value): it becomes one opaque node."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if bool(x.sum() > 0):
            q = q * 2
        return torch.softmax(q @ k.transpose(-2, -1), -1) @ v


class _WithOpaqueAttention(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(dim, dim), _OpaqueAttention(dim), nn.Linear(dim, 4)

    def forward(self, x):
        return self.head(self.attention(self.embed(x)).mean(1))


class _PlainMlp(nn.Module):
    """No attention, no residual: the network LoRA's fallback is for."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        return self.head(self.layers(x).mean(1))


@pytest.mark.parametrize(
    "which,frontend,evidence",
    [
        ("hidden", "auto", "a product of two activations normalised by exp (attention's softmax(Q K^T) V)"),
        ("opaque", "fx", "the opaque module attention (_OpaqueAttention)"),
    ],
)
def test_lora_fallback_is_not_applied_to_a_model_whose_attention_the_matcher_misses(
    hidden_attention, which, frontend, evidence
):
    model = _fresh(hidden_attention, "Hidden") if which == "hidden" else _WithOpaqueAttention()
    gm = trace(model.eval(), torch.randn(2, 5, 16), frontend=frontend)
    rules = load_rules("lora")
    found = {m.rule.name: m for m in match_rules(gm, rules)}
    assert found["lora"].regions == []  # the matcher misses the attention: the case the fallbacks must not cover
    for fallback in ("lora_blocks", "lora_plain"):
        assert found[fallback].regions == []
        assert found[fallback].standby.startswith("not applied: a fallback never tunes a model with attention")
        assert evidence in found[fallback].standby
    report = match_report(gm, gm, rules, "model")
    assert report["empty_rules"] == ["lora"]  # so match and rewrite exit 3, saying so


class _BilinearMixer(nn.Module):
    """Products of two activations with no softmax between them (timm's BAT, EfficientViM's state-space
    mixer): no attention, so LoRA's fallback tunes it."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)

    def forward(self, x):
        h = self.embed(x)
        gram = torch.sigmoid(h) @ h.transpose(-2, -1)  # [B, T, T], never normalised over a Q K^T
        return self.head(self.mix(gram @ h).mean(1))


def test_lora_fallback_tunes_a_network_that_multiplies_activations_without_attention():
    gm = trace(_BilinearMixer().eval(), torch.randn(2, 5, 16))
    found = {m.rule.name: m for m in match_rules(gm, load_rules("lora"))}
    assert found["lora_plain"].standby is None
    assert [region.scope for region in found["lora_plain"].regions] == ["embed", "mix"]


def test_lora_fallback_still_tunes_a_plain_network():
    gm = trace(_PlainMlp().eval(), torch.randn(2, 5, 16))
    found = {m.rule.name: m for m in match_rules(gm, load_rules("lora"))}
    assert found["lora_plain"].standby is None
    assert [region.scope for region in found["lora_plain"].regions] == ["layers.0", "layers.2"]


def test_match_and_rewrite_refuse_the_fallback_alike_on_the_command_line(hidden_attention, tmp_path, capsys):
    model, shape = f"{hidden_attention}:Hidden", ["--input-shape", "2,5,16"]
    match_code, match_out, match_err = _cli(capsys, "match", model, "--rules", "lora", *shape)
    rewrite_code, _, rewrite_err = _cli(capsys, "rewrite", model, "--rules", "lora", *shape, "-o", tmp_path / "t")
    assert match_code == rewrite_code == 3
    assert match_err == rewrite_err and "rule(s) lora in" in match_err
    assert "not applied: a fallback never tunes a model with attention" in " ".join(match_out.split())


@pytest.mark.parametrize(
    "entry,what",
    [
        ("gemma2", "attention soft-caps its scores: cap * tanh(scores / cap) before the softmax"),
        ("falcon", "linears read their weights as W.T (aten numpy_T under torch.export)"),
        ("albert", "one shared layer runs once per block: each call is a block of its own"),
        ("mpnet", "scores + a relative position bias made before the first layer is no residual"),
        ("siglip", "the pooling head's MLP adds to its attention's output: one block holds both"),
    ],
)
def test_the_dual_utuner_finds_as_many_attentions_and_ffns_as_the_config_has(entry, what):
    """Truth from the config (num_hidden_layers), not from the matcher: one MHA and one FFN a layer."""
    from utune_fx.specs import load_model
    from utune_fx.trace import node_info
    from utune_fx.zoo.hf_catalog import HF_MODELS, expected_counts
    from utune_fx.zoo.truth import attention_modules

    loaded = load_model(HF_MODELS[entry])
    expected = expected_counts(loaded.model.config)
    if entry == "siglip":  # two towers of 2 layers, and the vision tower's attention-pooling head
        assert expected == {"self_attention": 4, "cross_attention": 1, "ffn": 5}
    else:
        assert expected == {"self_attention": 2, "cross_attention": 0, "ffn": 2}
    gm = trace(loaded.model, loaded.inputs)
    found = {m.rule.name: m for m in match_rules(gm, load_rules("dual_utuner"))}
    assert len(found["mha"].regions) == expected["self_attention"] + expected["cross_attention"], what
    assert len(found["ffn"].regions) == expected["ffn"], what
    ffn_scopes = [region.scope for region in found["ffn"].regions]
    assert len(set(ffn_scopes)) == len(ffn_scopes) - (entry == "albert"), ffn_scopes  # ALBERT: one module, 2 calls
    # LoRA on every linear of every attention module, and nowhere else (Gemma 2's k_proj is 13 data
    # edges from its attention, through RoPE, repeat_kv and the soft-capping)
    projections = {
        inner
        for path, module in attention_modules(loaded.model).items()
        for inner, child in module.named_modules(prefix=path)
        if isinstance(child, (nn.Linear, nn.MultiheadAttention))  # an MHA: its own in_proj_weight
    }
    lora = {m.rule.name: m for m in match_rules(gm, load_rules("lora"))}["lora"]
    assert {node_info(region.anchor).scope for region in lora.regions} == projections


def test_siglip_pooling_head_utuner_reads_the_learned_query_and_matches_a_hooked_eager_model():
    """The head attends with one learned query (nn.MultiheadAttention, no residual): its parallel
    U-Tuner reads that query, [1, B, C] seq-first beside the out_proj's [B, C]. Truth: the eager model
    with U(probe) added to the head attention's output by a forward hook."""
    import copy

    from utune_fx.rewrite import rewrite
    from utune_fx.specs import load_model
    from utune_fx.zoo.hf_catalog import HF_MODELS

    loaded = load_model(HF_MODELS["siglip"])
    reference = copy.deepcopy(loaded.model)
    result = rewrite(trace(loaded.model, loaded.inputs), load_rules("dual_utuner"))
    (index,) = [i for i, scope in enumerate(result.summaries[0].scopes) if scope == "vision_model.head.attention"]
    adapter = result.module.get_submodule(f"utune.mha.{index}")
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.2)
        head = reference.vision_model.head
        shift = adapter(head.probe)  # [1, 1, C]: the same for every image
        assert shift.abs().max() > MOVED
        hook = head.attention.register_forward_hook(lambda module, args, out: (out[0] + shift, *out[1:]))
        expected = reference(*loaded.inputs)
        hook.remove()
        got = result.module(*loaded.inputs)
    torch.testing.assert_close(
        got.vision_model_output.pooler_output, expected.vision_model_output.pooler_output, **LOGITS_TOL
    )
    assert not torch.allclose(
        got.vision_model_output.pooler_output,
        loaded.model(*loaded.inputs).vision_model_output.pooler_output,
        atol=MOVED,
    )
