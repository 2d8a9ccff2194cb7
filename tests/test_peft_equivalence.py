"""utune_fx's LoRA equals PEFT's on the same layers, rank, alpha and weights: timm's linears,
transformers' Conv1D (addmm with W [in, out]) and embeddings, unfolded and folded."""

import copy
import textwrap

import pytest
import timm
import torch

from utune_fx.errors import UtuneError
from utune_fx.fold import fold
from utune_fx.match import load_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite import rewrite
from utune_fx.trace import node_info, trace

peft = pytest.importorskip("peft")
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # PEFT full-matches a string


def _vit_twice():
    """A small ViT, an input, and an independent copy with the same weights for PEFT."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    return model, torch.randn(2, 3, 32, 32), copy.deepcopy(model)


def test_lora_matches_peft(tmp_path):
    model, x, same_weights = _vit_twice()
    rules = tmp_path / "lora.yaml"
    rules.write_text(
        textwrap.dedent("""
        version: 1
        patterns:
          transformer_linear:
            node: {kind: linear, scope: ["**.qkv", "**.proj", "**.fc1", "**.fc2"]}
        rules:
          - {name: lora, match: transformer_linear, tuner: lora, settings: {rank: 4, alpha: 8}}
        """)
    )
    ours = rewrite(trace(model, x), load_rules(rules))
    reference = peft.get_peft_model(
        same_weights, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    )

    # Same tuner weights, away from identity: copy ours (after randomising B) into PEFT's.
    torch.manual_seed(1)
    regions = ours.summaries[0].scopes
    assert len(regions) == 8
    peft_modules = dict(reference.base_model.model.named_modules())
    for index, scope in enumerate(regions):
        branch = ours.module.get_submodule(f"utune.lora.{index}")
        with torch.no_grad():
            branch.lora_B.weight.normal_(0, 0.1)
            target = peft_modules[scope]
            target.lora_A["default"].weight.copy_(branch.lora_A.weight)
            target.lora_B["default"].weight.copy_(branch.lora_B.weight)
    with torch.no_grad():
        ours_out, peft_out = ours.module(x), reference(x)
    assert not torch.allclose(ours_out, model(x), atol=1e-3)
    torch.testing.assert_close(ours_out, peft_out, atol=1e-6, rtol=1e-6)
    peft_trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert (
        ours.trainable_parameters
        == peft_trainable
        == sum(4 * (m.in_features + m.out_features) for s in regions for m in [model.get_submodule(s)])
    )


def test_ia3_matches_peft(tmp_path):
    """IA3 = scale_shift without shift: PEFT scales qkv's output and fc2's input by l;
    utune_fx scales qkv's output and the FFN activation (fc2's input) by 1 + g."""
    model, x, same_weights = _vit_twice()
    rules = tmp_path / "ia3.yaml"
    rules.write_text(
        textwrap.dedent("""
        version: 1
        patterns:
          qkv: {node: {kind: linear, scope: "**.qkv"}}
          ffn_act: {node: {kind: act, scope: "**.mlp.act"}}
        rules:
          - {name: attention, match: qkv, tuner: scale_shift, settings: {shift: false}}
          - {name: ffn, match: ffn_act, tuner: scale_shift, settings: {shift: false}}
        """)
    )
    ours = rewrite(trace(model, x), load_rules(rules))
    reference = peft.get_peft_model(
        same_weights,
        peft.IA3Config(
            target_modules=r"blocks\.\d+\.(attn\.qkv|mlp\.fc2)", feedforward_modules=r"blocks\.\d+\.mlp\.fc2"
        ),
    )
    peft_modules = dict(reference.base_model.model.named_modules())
    torch.manual_seed(2)
    for rule, suffix in (("attention", "attn.qkv"), ("ffn", "mlp.fc2")):
        for index in range(2):
            ours_scale = ours.module.get_submodule(f"utune.{rule}.{index}").scale
            with torch.no_grad():
                ours_scale.normal_(0, 0.2)
                target = peft_modules[f"blocks.{index}.{suffix}"].ia3_l["default"]
                target.copy_((1 + ours_scale).reshape(target.shape))
    with torch.no_grad():
        ours_out, peft_out = ours.module(x), reference(x)
    assert not torch.allclose(ours_out, model(x), atol=1e-3)
    torch.testing.assert_close(ours_out, peft_out, atol=1e-5, rtol=1e-5)  # y + y*g vs y*(1+g): rounding only
    assert (
        ours.trainable_parameters
        == sum(p.numel() for p in reference.parameters() if p.requires_grad)
        == 2 * (576 + 768)
    )


# --- addmm-form linears (transformers' Conv1D, W stored [in, out]) and embeddings ------------------

EXACT = {"atol": 1e-5, "rtol": 1e-5}  # float32: the same products summed in another order


def _lora_rules(tmp_path, node: str, rank: int = 4, alpha: int = 8):
    rules = tmp_path / "lora.yaml"
    rules.write_text(
        textwrap.dedent(f"""
        version: 1
        patterns:
          target: {{node: {node}}}
        rules:
          - {{name: lora, match: target, tuner: lora, settings: {{rank: {rank}, alpha: {alpha}}}}}
        """)
    )
    return load_rules(rules)


def _estimate(gm, rules) -> int:
    """What ``match`` says the rules add, on the graph before it is rewritten."""
    return match_report(gm, gm, rules, "model")["added_parameters"]


def _hidden(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _randomise(result) -> None:
    """Move every LoRA branch away from identity (A and B), so both factors are exercised."""
    with torch.no_grad():
        for name, parameter in result.module.named_parameters():
            if name.startswith("utune."):
                parameter.normal_(0, 0.1)


def _folded(result):
    folded = fold(result.module, result.summaries)
    assert [entry.status for entry in folded.entries] == ["folded"] * len(result.summaries[0].scopes)
    assert not any(str(n.target).startswith("utune") for n in folded.module.graph.nodes)
    assert not any(name.startswith("utune") for name, _ in folded.module.named_parameters())
    return folded.module


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2Model(config).eval()
    model.config.use_cache = False
    return model, torch.randint(0, 100, (2, 8)), copy.deepcopy(model)


def test_lora_on_gpt2_conv1d_matches_peft_unfolded_and_folded(tmp_path):
    """GPT-2's Conv1D layers compute addmm(b, x, W) with W [in, out]; torch.export spells them
    aten.addmm (fx cannot trace GPT2Model in transformers 5)."""
    model, ids, same_weights = _gpt2()
    gm = trace(model, (ids,), frontend="export")
    rules = _lora_rules(tmp_path, '{kind: linear, scope: ["**.c_attn", "**.c_proj", "**.c_fc"]}')
    estimate = _estimate(gm, rules)
    ours = rewrite(gm, rules)
    reference = peft.get_peft_model(
        same_weights,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    )
    scopes = ours.summaries[0].scopes
    assert len(scopes) == 4 * model.config.n_layer
    _randomise(ours)
    peft_modules = dict(reference.base_model.model.named_modules())
    for index, scope in enumerate(scopes):
        branch = ours.module.get_submodule(f"utune.lora.{index}")
        with torch.no_grad():
            peft_modules[scope].lora_A["default"].weight.copy_(branch.lora_A.weight)
            peft_modules[scope].lora_B["default"].weight.copy_(branch.lora_B.weight)
    with torch.no_grad():
        base, ours_out, peft_out = _hidden(model(ids)), _hidden(ours.module(ids)), _hidden(reference(ids))
    assert not torch.allclose(ours_out, base, atol=1e-2)
    torch.testing.assert_close(ours_out, peft_out, **EXACT)
    # c_attn (d -> 3d), attention c_proj (d -> d), c_fc (d -> 4d), MLP c_proj (4d -> d): r * 16 d per layer
    closed_form = 4 * 16 * model.config.n_embd * model.config.n_layer
    peft_trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert estimate == ours.summaries[0].added_parameters == peft_trainable == closed_form

    folded = _folded(ours)
    merged = reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(_hidden(folded(ids)), _hidden(merged(ids)), **EXACT)
    for scope in scopes:  # W + (B @ A).T * s written in W's own [in, out] layout, as PEFT merges it
        torch.testing.assert_close(
            folded.get_parameter(f"{scope}.weight"), merged.get_submodule(scope).weight, atol=1e-6, rtol=1e-6
        )


class _Conv1DNet(torch.nn.Module):
    """Two transformers Conv1D layers (W [in, out]), traced by fx and torch.export alike."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc, self.c_proj = Conv1D(32, 16), Conv1D(16, 32)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_transformers_conv1d_matches_peft_under_both_front_ends(tmp_path, frontend):
    pytest.importorskip("transformers")
    model, x = _Conv1DNet().eval(), torch.randn(2, 5, 16)
    same_weights = copy.deepcopy(model)
    gm = trace(model, (x,), frontend=frontend)
    rules = _lora_rules(tmp_path, "{kind: linear}", rank=3, alpha=6)
    estimate = _estimate(gm, rules)
    ours = rewrite(gm, rules)
    reference = peft.get_peft_model(
        same_weights, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)
    )
    assert ours.summaries[0].scopes == ["c_fc", "c_proj"]
    _randomise(ours)
    for index, scope in enumerate(ours.summaries[0].scopes):
        branch, target = (
            ours.module.get_submodule(f"utune.lora.{index}"),
            reference.base_model.model.get_submodule(scope),
        )
        with torch.no_grad():
            target.lora_A["default"].weight.copy_(branch.lora_A.weight)
            target.lora_B["default"].weight.copy_(branch.lora_B.weight)
    with torch.no_grad():
        ours_out, peft_out = ours.module(x), reference(x)
    assert not torch.allclose(ours_out, model(x), atol=1e-2)
    torch.testing.assert_close(ours_out, peft_out, **EXACT)
    assert (
        estimate
        == ours.summaries[0].added_parameters
        == sum(p.numel() for p in reference.parameters() if p.requires_grad)
    )
    assert estimate == 3 * (16 + 32) * 2
    folded = _folded(ours)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), reference.merge_and_unload()(x), **EXACT)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_ia3_on_transformers_conv1d_matches_peft_and_folds_into_w_in_its_layout(tmp_path, frontend):
    """The sequential merge (W' = W diag(1 + g) for W [in, out]) through the same view of W as LoRA's."""
    pytest.importorskip("transformers")
    model, x = _Conv1DNet().eval(), torch.randn(2, 5, 16)
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.IA3Config(target_modules=["c_fc"], feedforward_modules=[], fan_in_fan_out=True)
    )
    rules = tmp_path / "ia3.yaml"
    rules.write_text(
        "version: 1\npatterns: {c_fc: {node: {kind: linear, scope: c_fc}}}\n"
        "rules: [{name: ia3, match: c_fc, tuner: scale_shift, settings: {shift: false}}]\n"
    )
    ours = rewrite(trace(model, (x,), frontend=frontend), load_rules(rules))
    scale, target = ours.module.get_submodule("utune.ia3.0").scale, reference.base_model.model.c_fc.ia3_l["default"]
    with torch.no_grad():
        scale.normal_(0, 0.2)
        target.copy_((1 + scale).reshape(target.shape))
        peft_out = reference(x)
        assert not torch.allclose(peft_out, model(x), atol=1e-3)
        torch.testing.assert_close(ours.module(x), peft_out, **EXACT)
        torch.testing.assert_close(_folded(ours)(x), peft_out, **EXACT)


class _AddmmTransposed(torch.nn.Module):
    """A linear decomposed: addmm(b, x, W.t()) with W [out, in]."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.randn(24, 16) / 4), torch.nn.Parameter(torch.randn(24))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight.t())


def _rank_2_lora(tmp_path, model, x, frontend, added):
    """LoRA r = 2, alpha = 4 on the model's one linear, its size as match estimates it and rewrite adds,
    moved away from identity: (the rewrite, A and B in float64)."""
    gm = trace(model, (x,), frontend=frontend)
    rules = _lora_rules(tmp_path, "{kind: linear}", rank=2, alpha=4)
    estimate = _estimate(gm, rules)
    ours = rewrite(gm, rules)
    assert estimate == ours.summaries[0].added_parameters == added
    _randomise(ours)
    branch = ours.module.get_submodule("utune.lora.0")
    return ours, branch.lora_A.weight.double(), branch.lora_B.weight.double()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_addmm_with_a_transposed_weight_folds_into_w_against_float64(tmp_path, frontend):
    model, x = _AddmmTransposed().eval(), torch.randn(6, 16)
    ours, a, b = _rank_2_lora(tmp_path, model, x, frontend, added=2 * (16 + 24))
    expected = torch.addmm(model.bias.double(), x.double(), (model.weight.double() + 2 * b @ a).t())  # alpha/r = 2
    with torch.no_grad():
        torch.testing.assert_close(ours.module(x).double(), expected, **EXACT)
        folded = _folded(ours)
        torch.testing.assert_close(folded(x).double(), expected, **EXACT)
    torch.testing.assert_close(folded.get_parameter("weight").double(), model.weight.double() + 2 * b @ a, **EXACT)


class _ActivationAddmm(torch.nn.Module):
    """addmm between two activations (x @ (h^T h)) beside one real linear."""

    def __init__(self):
        super().__init__()
        self.proj, self.bias = torch.nn.Linear(8, 8), torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.proj(x)
        return torch.addmm(self.bias, x, h.t() @ h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_addmm_between_activations_is_no_linear_and_gets_no_lora(tmp_path, frontend):
    model, x = _ActivationAddmm().eval(), torch.randn(5, 8)
    gm = trace(model, (x,), frontend=frontend)
    addmm = [n for n in gm.graph.nodes if node_info(n).op_name == "addmm"]
    assert len(addmm) == 1 and node_info(addmm[0]).op_kind == "matmul"
    ours = rewrite(gm, _lora_rules(tmp_path, "{kind: linear}"))
    assert ours.summaries[0].scopes == ["proj"] and ours.summaries[0].added_parameters == 4 * (8 + 8)


class _LeftProduct(torch.nn.Module):
    """W @ x mixes the rows of x (here its tokens), not its channels."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return torch.matmul(self.mix, x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_refuses_a_weight_multiplied_from_the_left(tmp_path, frontend):
    gm = trace(_LeftProduct().eval(), (torch.randn(6, 4),), frontend=frontend)
    with pytest.raises(UtuneError, match=r"LoRA needs x of x @ W"):
        rewrite(gm, _lora_rules(tmp_path, "{kind: linear}"))


class _LeftProductOverTokens(torch.nn.Module):
    """Mamba's dt_proj: its weight multiplies [B, in, L] from the left (W @ x), channels on axis 1."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(12, 8) / 3)

    def forward(self, x):
        return self.weight @ x


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_a_weight_multiplied_from_the_left_over_tokens_is_a_1x1_conv_pair(tmp_path, frontend):
    """Closed form in float64: W x + (alpha / r) B A x; fold keeps the branch and says why (a weight
    from the left is no layer fold merges into yet)."""
    model, x = _LeftProductOverTokens().eval(), torch.randn(2, 8, 5)
    ours, a, b = _rank_2_lora(tmp_path, model, x, frontend, added=2 * (8 + 12))
    a, b = a.squeeze(-1), b.squeeze(-1)  # 1x1 Conv1d weights
    expected = (model.weight.double() + 2 * b @ a) @ x.double()  # alpha / r = 2
    folded = fold(ours.module, ours.summaries)
    [entry] = folded.entries
    assert entry.status == "kept" and "from the left" in entry.reason
    with torch.no_grad():
        torch.testing.assert_close(ours.module(x).double(), expected, **EXACT)
        torch.testing.assert_close(folded.module(x).double(), expected, **EXACT)


class _EmbeddingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(50, 16, padding_idx=0), torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.emb(ids))


class _FunctionalEmbeddingNet(torch.nn.Module):
    """The same model with the table as a bare parameter read by F.embedding."""

    def __init__(self, like: _EmbeddingNet):
        super().__init__()
        self.table, self.head = torch.nn.Parameter(like.emb.weight.detach().clone()), copy.deepcopy(like.head)

    def forward(self, ids):
        return self.head(torch.nn.functional.embedding(ids, self.table, padding_idx=0))


@pytest.mark.parametrize("functional", [False, True], ids=["nn.Embedding", "F.embedding"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_lora_on_an_embedding_matches_peft_unfolded_and_folded(tmp_path, frontend, functional):
    reference_model = _EmbeddingNet().eval()
    model = _FunctionalEmbeddingNet(reference_model).eval() if functional else copy.deepcopy(reference_model)
    ids = torch.randint(0, 50, (3, 7))
    ids[0, 0] = 0  # the padding row
    gm = trace(model, (ids,), frontend=frontend)
    rules = _lora_rules(tmp_path, "{kind: embedding}", rank=4, alpha=8)
    estimate = _estimate(gm, rules)
    ours = rewrite(gm, rules)
    reference = peft.get_peft_model(reference_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    branch = ours.module.get_submodule("utune.lora.0")
    # PEFT's initialisation for embeddings: A zero, B standard normal; the tuned model starts as the model
    assert not branch.lora_A.weight.any() and 0.5 < float(branch.lora_B.weight.detach().std()) < 1.5
    with torch.no_grad():
        torch.testing.assert_close(ours.module(ids), model(ids), atol=0, rtol=0)
    _randomise(ours)
    target = reference.base_model.model.emb
    with torch.no_grad():
        target.lora_embedding_A["default"].copy_(branch.lora_A.weight.T)  # PEFT's A [r, V]; ours its table A.T
        target.lora_embedding_B["default"].copy_(branch.lora_B.weight)
        ours_out, peft_out = ours.module(ids), reference(ids)
    assert not torch.allclose(ours_out, model(ids), atol=1e-2)
    torch.testing.assert_close(ours_out, peft_out, **EXACT)
    peft_trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert estimate == ours.summaries[0].added_parameters == peft_trainable == 4 * (50 + 16)
    folded = _folded(ours)
    merged = reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(folded(ids), merged(ids), **EXACT)
    table = "table" if functional else "emb.weight"
    torch.testing.assert_close(folded.get_parameter(table), merged.emb.weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_parallel_adapter_on_transformers_conv1d_folds_into_w_in_its_layout(tmp_path, frontend):
    """A linear parallel adapter beside addmm(b, x, W), W [in, out]: y = x (W + (s U D)^T) + b + s (U d + u),
    checked in float64 against the closed form, then folded into W and b."""
    pytest.importorskip("transformers")
    model, x = _Conv1DNet().eval(), torch.randn(2, 5, 16)
    rules = tmp_path / "adapter.yaml"
    rules.write_text(
        "version: 1\npatterns: {c_fc: {node: {kind: linear, scope: c_fc}}}\n"
        "rules: [{name: pa, match: c_fc, tuner: parallel_adapter, settings: {activation: identity}}]\n"
    )
    ours = rewrite(trace(model, (x,), frontend=frontend), load_rules(rules))
    _randomise(ours)
    adapter = ours.module.get_submodule("utune.pa.0")
    d, u = adapter.down, adapter.up
    s = adapter.scale.double() if adapter.scale is not None else adapter.fixed_scale
    c_fc, c_proj = model.c_fc, model.c_proj
    with torch.no_grad():
        w = c_fc.weight.double() + (s * u.weight.double() @ d.weight.double()).t()  # [in, out]
        b = c_fc.bias.double() + s * (u.weight.double() @ d.bias.double() + u.bias.double())
        expected = torch.relu(x.double() @ w + b) @ c_proj.weight.double() + c_proj.bias.double()
        assert not torch.allclose(expected.float(), model(x), atol=1e-3)
        torch.testing.assert_close(ours.module(x).double(), expected, **EXACT)
        folded = _folded(ours)
        torch.testing.assert_close(folded(x).double(), expected, **EXACT)
