"""Token models at any sequence length: the torch.export front end leaves the sequence axis of token
inputs dynamic (or says why it is fixed), the shipped rules keep it so, and the ONNX export declares it
dynamic and is verified at two lengths.

Truth from outside the code: the eager Hugging Face model at each length; for LoRA, the eager model with
the folded weights loaded into it; for the unfoldable dual U-Tuner, causality (a causal LM's first k
logits do not depend on later tokens); ONNX Runtime run here on lengths the export never saw."""

import inspect

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import utune_fx  # noqa: F401  (first: transformers imports torchvision, see utune_fx/_compat.py)

# isort: split
from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.export import export_onnx
from utune_fx.fold import fold
from utune_fx.match import load_rules
from utune_fx.rewrite import rewrite
from utune_fx.specs import load_model
from utune_fx.trace import trace, trace_report
from utune_fx.trace.sequence_axes import token_inputs

VOCAB = 100
GPT2 = f"hf:gpt2/causal-lm?n_layer=2&n_embd=64&n_head=4&vocab_size={VOCAB}&n_positions=64"
BERT = (
    "hf:bert/sequence-classification?hidden_size=32&num_hidden_layers=2&num_attention_heads=2"
    f"&intermediate_size=64&vocab_size={VOCAB}&max_position_embeddings=64"
)
T5 = f"hf:t5/seq2seq-lm?d_model=32&d_ff=64&num_layers=1&num_decoder_layers=1&num_heads=2&d_kv=16&vocab_size={VOCAB}"
GRAPH_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32: the graph runs the eager model's kernels
FOLD_TOL = {"rtol": 1e-4, "atol": 1e-4}  # float32: merged weights round differently from the branch
ONNX_TOL = {"rtol": 1e-4, "atol": 1e-5}  # verify.py's float32 tolerance
MOVED = 1e-3  # tuners away from identity change the logits by at least this much


def _inputs_at(model: nn.Module, examples: tuple, length: int, batch: int = 3, seed: int = 5) -> tuple:
    """Inputs like ``examples`` with ``length`` tokens (a decoder's: half as many), random ids, ones as masks."""
    generator = torch.Generator().manual_seed(seed)
    names = list(inspect.signature(model.forward).parameters)
    made = []
    for name, example in zip(names, examples):
        tokens = max(2, length // 2) if name.startswith("decoder") else length
        if "mask" in name:
            made.append(torch.ones(batch, tokens, dtype=example.dtype))
        else:
            made.append(torch.randint(0, VOCAB, (batch, tokens), generator=generator))
    return tuple(made)


def _logits(output) -> torch.Tensor:
    return output["logits"]


def _tuned(spec: str, rules: str):
    """(model, example inputs, rewrite result) with every tuner tensor moved away from identity."""
    loaded = load_model(spec)
    result = rewrite(trace(loaded.model, loaded.inputs), load_rules(rules))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in result.module.named_parameters():
            if parameter.requires_grad and name.startswith("utune."):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return loaded.model, loaded.inputs, result


# -- which inputs carry tokens -------------------------------------------------------------------


def test_token_inputs_are_integer_or_bool_rank_2_inputs_not_following_a_float_input():
    ids, mask = torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.bool)
    assert token_inputs((ids, mask, torch.zeros(2, 5, dtype=torch.int64))) == [True, True, True]
    assert token_inputs((torch.randn(2, 400), torch.ones(2, 400, dtype=torch.int64))) == [False, False]  # audio
    assert token_inputs((torch.randn(2, 3, 32, 32), torch.zeros(2, 3, 4, dtype=torch.int64))) == [False, False]
    features, mask = torch.randn(2, 80, 300), torch.ones(2, 80, dtype=torch.int64)  # Whisper's: mel bins, not tokens
    assert token_inputs((features, mask, ids)) == [False, False, True]


# -- (a) the frozen graph follows the eager model at every length ---------------------------------


@pytest.mark.parametrize("spec", [GPT2, BERT, T5], ids=["gpt2", "bert", "t5"])
def test_the_frozen_graph_matches_the_eager_model_at_lengths_it_was_not_traced_at(spec):
    loaded = load_model(spec)
    gm = trace(loaded.model, loaded.inputs)
    sequence = trace_report(gm).sequence
    assert trace_report(gm).frontend == "export"
    assert sequence.dynamic and sequence.reason is None
    assert sequence.inputs[0] == "input_ids" and sequence.lengths[0] == loaded.inputs[0].shape[1] == 8
    for length in (7, 16, 33):
        inputs = _inputs_at(loaded.model, loaded.inputs, length)
        with torch.no_grad():
            expected, traced = _logits(loaded.model(*inputs)), _logits(gm(*inputs))
        torch.testing.assert_close(traced, expected, **GRAPH_TOL)


# -- the rules keep the sequence free --------------------------------------------------------------


def test_lora_on_gpt2_folds_into_weights_the_eager_model_runs_at_any_length():
    model, _, result = _tuned(GPT2, "rules/lora.yaml")
    folded = fold(result.module, result.summaries).module
    eager = load_model(GPT2).model
    missing, unexpected = eager.load_state_dict(folded.state_dict(), strict=False)
    assert not unexpected and all(name.endswith(("attn.bias", "masked_bias")) for name in missing)
    for length in (7, 33):
        inputs = (torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(length)),)
        with torch.no_grad():
            tuned, merged, frozen = _logits(result.module(*inputs)), eager(*inputs).logits, model(*inputs).logits
        assert (tuned - frozen).abs().max() > MOVED  # the tuners act
        torch.testing.assert_close(tuned, merged, **FOLD_TOL)


@pytest.mark.parametrize("rules", ["dual_utuner", "adapter", "utuner_mha", "prefix"])
def test_tuned_gpt2_stays_causal_at_other_lengths(rules):
    """The first k logits at 33 tokens are those of the first k tokens alone: nothing of length 8 is baked in."""
    model, _, result = _tuned(GPT2, f"rules/{rules}.yaml")
    ids = torch.randint(0, VOCAB, (3, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, frozen = _logits(result.module(ids)), model(ids).logits
        for length in (7, 12):
            torch.testing.assert_close(_logits(result.module(ids[:, :length])), whole[:, :length], **GRAPH_TOL)
    assert (whole - frozen).abs().max() > MOVED


@pytest.mark.parametrize("rules", ["vpt_shallow", "vpt_deep"])
def test_prompts_refuse_a_graph_whose_token_count_comes_from_the_input_ids(rules):
    loaded = load_model(GPT2)
    with pytest.raises(UtuneError, match="takes the token count from the model's inputs"):
        rewrite(trace(loaded.model, loaded.inputs), load_rules(f"rules/{rules}.yaml"))


# -- (b) ONNX: dynamic batch and sequence, verified at two lengths ----------------------------------


@pytest.mark.parametrize("rules", ["lora", "dual_utuner"])
def test_the_tuned_onnx_export_runs_at_lengths_it_was_not_exported_at(rules, tmp_path):
    model, examples, result = _tuned(GPT2, f"rules/{rules}.yaml")
    exported = export_onnx(result.module, examples, tmp_path / "model.onnx")
    assert exported.dynamic_axes == {"input_ids": {0: "batch", 1: "sequence"}}
    assert exported.sequence_fixed is None
    checked = [(check.batch_size, check.sequence_lengths) for check in exported.parity.checks]
    assert checked == [(1, [8]), (4, [8]), (1, [13]), (4, [13])]
    assert all(check.passed for check in exported.parity.checks)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", "sequence"]
    for length in (12, 33):
        ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = _logits(result.module(ids))
        (got,) = session.run(None, {"input_ids": ids.numpy()})
        assert got.shape == (2, length, VOCAB)
        np.testing.assert_allclose(got, expected.numpy(), **ONNX_TOL)


def test_an_encoder_decoder_exports_two_sequence_axes(tmp_path):
    _, examples, result = _tuned(T5, "rules/lora.yaml")
    exported = export_onnx(result.module, examples, tmp_path / "t5.onnx", batch_sizes=(2,))
    assert exported.dynamic_axes == {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "decoder_input_ids": {0: "batch", 1: "sequence_2"},
    }
    assert [check.sequence_lengths for check in exported.parity.checks] == [[8, 5], [13, 10]]
    assert exported.parity.checks[1].where == "batch 2, lengths 13/10"


# -- a model that fixes its sequence length -----------------------------------------------------------


class FixedLength(nn.Module):
    """Adds a learned position table of 8 rows: torch.export must specialise the token count."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.positions = nn.Parameter(torch.randn(1, 8, 16))
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        hidden = self.embed(ids) + self.positions
        return self.head(self.attention(hidden, hidden, hidden)[0])


class BranchesOnLength(nn.Module):
    """Runs at any length in eager PyTorch, but takes a branch on the token count."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        hidden = self.embed(ids)
        if ids.shape[1] == 8:
            hidden = hidden * 2
        return self.head(hidden)


@pytest.mark.parametrize("build", [FixedLength, BranchesOnLength])
def test_a_model_that_specialises_the_length_traces_static_and_the_report_says_so(build):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    gm = trace(model, (ids,), frontend="export")
    sequence = trace_report(gm).sequence
    assert not sequence.dynamic
    assert sequence.inputs == ["ids"] and sequence.lengths == [8]
    assert "specialises ids axis 1 to 8" in sequence.reason
    assert sequence.describe().startswith("sequence length fixed at 8 (ids) because torch.export specialises")
    other = torch.randint(0, VOCAB, (3, 8))
    with torch.no_grad():
        torch.testing.assert_close(gm(other), model(other), rtol=0, atol=0)
    with pytest.raises(Exception, match="shape\\[1\\]"):
        gm(torch.randint(0, VOCAB, (2, 12)))


def test_a_fixed_length_exports_and_verifies_at_that_length_only(tmp_path):
    torch.manual_seed(0)
    model = FixedLength().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    gm = trace(model, (ids,), frontend="export")
    exported = export_onnx(gm, (ids,), tmp_path / "fixed.onnx")
    assert exported.dynamic_axes == {"ids": {0: "batch"}}
    assert "specialises ids axis 1 to 8" in exported.sequence_fixed
    assert [(c.batch_size, c.sequence_lengths) for c in exported.parity.checks] == [(1, [8]), (4, [8])]


def test_inspect_and_export_print_the_sequence_axis(tmp_path, capsys):
    builder = tmp_path / "fixed.py"
    builder.write_text(
        f"import torch\nfrom torch import nn\n\nVOCAB = {VOCAB}\n\n\n{inspect.getsource(FixedLength)}\n\n"
        "def build():\n    torch.manual_seed(0)\n    return FixedLength()\n"
    )
    assert main(["inspect", GPT2]) == 0
    assert "sequence length dynamic (axis 1 of input_ids; traced at 8)" in capsys.readouterr().out
    fixed = [f"{builder}:build", "--input-shape", "2,8:int64", "--frontend", "export"]
    assert main(["inspect", *fixed]) == 0
    assert "sequence length fixed at 8 (ids) because torch.export specialises ids axis 1" in capsys.readouterr().out
    assert main(["rewrite", GPT2, "--rules", "lora", "-o", str(tmp_path / "lora")]) == 0
    assert "sequence length dynamic" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "lora"), "-o", str(tmp_path / "lora.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "dynamic batch and sequence:" in printed
    assert "vs PyTorch, batch 4, length 13: max abs error" in printed
