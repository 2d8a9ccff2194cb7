"""The shipped patterns: each fires where it should, not where it should not,
and finds exactly the right regions across model families, by structure."""

import textwrap

import pytest
import timm
import torch
from torch import nn
from toy_models import GroupedMoeLayer, TinyGpt, tiny_moe, transformer_encoder

from utune_fx.match import MatchContext, load_prelude, load_rules, match_rules
from utune_fx.trace import trace

PRELUDE = load_prelude()


def _trace_timm(name, size, **kwargs):
    return trace(timm.create_model(name, pretrained=False, **kwargs).eval(), torch.randn(2, 3, size, size))


MODELS = {
    "vit": lambda: _trace_timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=3),
    "deit": lambda: _trace_timm("deit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2),
    "beit": lambda: _trace_timm(
        "beit_base_patch16_224", 32, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2
    ),
    "eva": lambda: _trace_timm("eva02_tiny_patch14_224", 56, img_size=56, depth=2),
    "swin": lambda: _trace_timm(
        "swin_tiny_patch4_window7_224", 224, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    ),
    "cait": lambda: _trace_timm("cait_xxs24_224", 32, img_size=32, patch_size=8, depth=2),
    "pit": lambda: _trace_timm("pit_ti_224", 224, depth=(1, 1, 1)),
    "maxvit": lambda: _trace_timm("maxvit_pico_rw_256", 64, img_size=64),
    # fx keeps nn.MultiheadAttention one module (auto would take torch.export, which sees inside it)
    "encoder": lambda: trace(transformer_encoder(layers=3).eval(), torch.randn(2, 5, 32), frontend="fx"),
    "gpt": lambda: trace(TinyGpt(layers=2).eval(), torch.randint(0, 50, (2, 9))),
    "resnet": lambda: _trace_timm("resnet18", 64),
    "convnext": lambda: _trace_timm("convnext_atto", 64, depths=(1, 1, 1, 1)),
    "efficientnet": lambda: _trace_timm("efficientnet_b0", 64),
    "plain_mlp": lambda: trace(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(2, 8)),
    "convs": lambda: trace(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval(), torch.randn(2, 3, 16, 16)
    ),
    "mixer": lambda: trace(
        timm.models.mlp_mixer.MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=64).eval(),
        torch.randn(2, 3, 64, 64),
    ),
    "densenet": lambda: _trace_timm("densenet121", 64, block_config=(1, 1, 1, 1)),
    "moe": lambda: trace(tiny_moe(shared=True).eval(), torch.randn(2, 5, 16), frontend="export"),
    "grouped_moe": lambda: trace(nn.Sequential(GroupedMoeLayer(), GroupedMoeLayer()).eval(), torch.randn(2, 4, 16)),
    # FFNs beyond fc1 -> act -> fc2: PVTv2's depthwise conv on the token grid, CAFormer's StarReLU
    "pvt": lambda: _trace_timm("pvt_v2_b0", 64, depths=(1, 1, 1, 1)),
    "caformer": lambda: trace(
        timm.models.metaformer.MetaFormer(
            depths=(1, 1, 1, 1),
            dims=(16, 32, 64, 64),
            token_mixers=[timm.models.metaformer.SepConv] * 2 + [timm.models.metaformer.Attention] * 2,
            norm_layers=[timm.models.metaformer.LayerNorm2dNoBias] * 2 + [timm.models.metaformer.LayerNormNoBias] * 2,
        ).eval(),
        torch.randn(2, 3, 64, 64),
    ),
}
_cache: dict = {}


def context(model: str) -> MatchContext:
    if model not in _cache:
        _cache[model] = MatchContext(MODELS[model]())
    return _cache[model]


def count(pattern: str, model: str) -> int:
    return len(context(model).regions(PRELUDE[pattern]))


# (pattern, model where it fires with the count, model where it must not fire)
FIRES = [
    ("attention_projected", "vit", 3, "encoder"),
    ("attention_module", "encoder", 3, "vit"),
    ("attention", "gpt", 2, "resnet"),
    ("mlp", "vit", 3, "efficientnet"),  # squeeze-excitation gates are no mlp
    ("conv_mlp", "pvt", 4, "resnet"),  # no depthwise conv between 1x1 convs in a ResNet
    ("conv_ffn", "resnet", 5, "vit"),  # basic blocks that keep their width (a stage's first widens)
    ("transformer_block", "swin", 4, "convnext"),
    ("routing", "moe", 2, "vit"),
    ("routed", "moe", 4, "vit"),  # each MoE sub-layer, and the sum of its routed and shared experts
    ("routed_by_top_k", "moe", 4, "grouped_moe"),
    ("grouped_experts", "grouped_moe", 4, "moe"),  # two grouped matmuls per layer; argmax routing
    ("routed_to_grouped_experts", "grouped_moe", 2, "moe"),
    ("moe", "moe", 2, "vit"),  # the outermost only
    ("dense_ffn", "moe", 1, "plain_mlp"),  # the dense layer's mlp (the shared experts are the MoEs' parts); not 8 -> 4
    ("ffn", "encoder", 3, "convnext"),  # ConvNeXt has mlps but no attention
    ("residual", "resnet", 8, "plain_mlp"),
    ("block", "resnet", 8, "plain_mlp"),
    ("linear", "plain_mlp", 2, "convs"),
    ("conv", "resnet", 20, "encoder"),
    ("norm", "vit", 7, "plain_mlp"),
    ("head", "vit", 1, "encoder"),
]


@pytest.mark.parametrize("pattern,model,expected,silent", FIRES, ids=[f[0] for f in FIRES])
def test_pattern_fires(pattern, model, expected, silent):
    assert count(pattern, model) == expected


@pytest.mark.parametrize("pattern,model,expected,silent", FIRES, ids=[f[0] for f in FIRES])
def test_pattern_must_not_fire(pattern, model, expected, silent):
    assert count(pattern, silent) == 0
    assert PRELUDE[pattern].explain(context(silent))  # and says why


def test_every_prelude_pattern_has_a_fires_row():
    assert {row[0] for row in FIRES} == set(PRELUDE)


# attention, ffn and transformer blocks with no name hints, across families
TRANSFORMERS = [
    ("vit", 3),
    ("deit", 2),
    ("beit", 2),
    ("eva", 2),
    ("swin", 4),
    ("cait", 4),
    ("pit", 3),
    ("maxvit", 22),
    ("encoder", 3),
    ("gpt", 2),
]


@pytest.mark.parametrize("model,layers", TRANSFORMERS, ids=[t[0] for t in TRANSFORMERS])
def test_transformer_patterns_count_exactly(model, layers):
    assert count("attention", model) == layers
    assert count("ffn", model) == layers
    assert count("transformer_block", model) == layers


@pytest.mark.parametrize("model", ["resnet", "convnext"])
def test_transformer_patterns_do_not_fire_without_attention(model):
    assert count("attention", model) == count("ffn", model) == count("transformer_block", model) == 0
    assert count("block", model) > 0  # block-level tuning still has somewhere to go


def test_gpt_attention_region_spans_its_projections():
    (first, _) = context("gpt").regions(PRELUDE["attention"])
    assert first.scope == "h.0.attn"
    assert [n.name for n in first.captures["qkv"]] == ["h_0_attn_c_attn"]
    assert first.output.name == "h_0_attn_c_proj"
    assert first.in_shape == first.out_shape == (2, 9, 32)


def _rules(tmp_path, body: str):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(body))
    return load_rules(path)


def _selected(tmp_path, selection: str, model: str = "vit") -> list[str]:
    rules = _rules(
        tmp_path,
        f"""
        version: 1
        rules:
          - name: r
            match: attention
            tuner: parallel_adapter
            {selection}
        """,
    )
    (found,) = match_rules(context(model).gm, rules, context(model))
    return [r.scope for r in found.regions]


@pytest.mark.parametrize(
    "selection,expected",
    [
        ("", [0, 1, 2]),
        ("layers: 0", [0]),
        ("layers: -1", [2]),
        ("layers: '0:2'", [0, 1]),
        ("layers: '1:'", [1, 2]),
        ("layers: '::2'", [0, 2]),
        ("layers: [0, '2:']", [0, 2]),
        ("first: 2", [0, 1]),
        ("last: 1", [2]),
        ("every: 2", [0, 2]),
        ("layers: 7", []),
        ("scope: 'blocks.1.*'", [1]),
        ("exclude: {layers: 1}", [0, 2]),
        ("exclude: {scope: 'blocks.0.**'}", [1, 2]),
        ("first: 2\n            exclude: {layers: 0}", [1]),
    ],
)
def test_occurrence_selection_and_exclusion(tmp_path, selection, expected):
    assert _selected(tmp_path, selection) == [f"blocks.{i}.attn" for i in expected]


def test_overlapping_regions_of_one_rule_keep_the_earlier_and_report_the_rest(tmp_path):
    rules = _rules(
        tmp_path,
        """
        version: 1
        rules:
          - name: blocks_or_attention
            match: {any_of: [transformer_block, attention]}
            tuner: parallel_adapter
        """,
    )
    ctx = context("vit")
    (found,) = match_rules(ctx.gm, rules, ctx)
    assert [r.scope for r in found.regions] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [(r.scope, why) for r, why in found.dropped] == [
        (f"blocks.{i}.attn", f"overlaps the region kept at blocks.{i}") for i in range(3)
    ]


def test_rules_may_overlap_each_other(tmp_path):
    rules = _rules(
        tmp_path,
        """
        version: 1
        rules:
          - {name: blocks, match: transformer_block, tuner: parallel_adapter}
          - {name: attention, match: attention, tuner: lora}
        """,
    )
    found = match_rules(context("vit").gm, rules, context("vit"))
    assert [len(f.regions) for f in found] == [3, 3]


def test_user_graph_pattern_with_captures_and_scope_pattern(tmp_path):
    rules = _rules(
        tmp_path,
        """
        version: 1
        patterns:
          qk_softmax:
            graph:
              nodes:
                scores: {kind: matmul}
                probs: {kind: softmax}
              edges: ["scores ->* probs"]
              through: [mul, div, arith, getitem, compare]
          gpt_mlp_scope:
            scope: "h.*.mlp"
        rules:
          - {name: softmax, match: qk_softmax, tuner: scale_shift}
          - {name: mlps, match: gpt_mlp_scope, tuner: parallel_adapter}
        """,
    )
    ctx = context("gpt")
    softmax, mlps = match_rules(ctx.gm, rules, ctx)
    assert len(softmax.regions) == 2 and set(softmax.regions[0].captures) == {"scores", "probs"}
    assert [r.scope for r in mlps.regions] == ["h.0.mlp", "h.1.mlp"]
    assert mlps.regions[0].output.name == "h_0_mlp_c_proj"


def test_region_cache_keeps_its_patterns_alive(tmp_path):
    """Regions are cached by pattern identity; a collected pattern's id could
    be reused by another pattern and hit its stale regions."""
    import gc
    import weakref

    ctx = MatchContext(context("vit").gm)
    rules = _rules(tmp_path, "version: 1\nrules: [{name: r, match: {node: {kind: linear}}, tuner: lora}]\n")
    pattern = rules.rules[0].pattern
    assert len(ctx.regions(pattern)) == 13
    alive = weakref.ref(pattern)
    del rules, pattern
    gc.collect()
    assert alive() is not None


def test_outside_keeps_the_regions_in_no_region_of_another_pattern(tmp_path):
    rules = _rules(
        tmp_path,
        """
        version: 1
        patterns:
          loose_linear: {node: {kind: linear}, outside: transformer_block}
          blocked_linear: {node: {kind: linear}, within: block, outside: transformer_block}
        rules:
          - {name: loose, match: loose_linear, tuner: lora}
          - {name: blocked, match: blocked_linear, tuner: lora}
        """,
    )
    loose, blocked = match_rules(context("vit").gm, rules, context("vit"))
    assert [r.scope for r in loose.regions] == ["head"]  # every other linear is inside a ViT block
    assert blocked.regions == [] and "none within 'block' and outside 'transformer_block'" in rules.rules[
        1
    ].pattern.explain(context("vit"))
    mixer_loose, mixer_blocked = match_rules(context("mixer").gm, rules, context("mixer"))
    assert len(mixer_blocked.regions) == 8  # two blocks, each a token MLP and a channel MLP of two linears


# the shipped LoRA rule: attention projections (and nothing else where there is attention); in
# attention-free networks every layer of residual blocks (its first fallback); where neither exists,
# every layer but the classifier (its second)
LORA_ROWS = [
    ("vit", 6, None, None),
    ("resnet", None, 19, None),
    ("convnext", None, 12, None),
    ("mixer", None, 8, None),
    ("densenet", None, None, 12),
    ("convs", None, None, 1),
]


@pytest.mark.parametrize("model,lora,blocks,plain", LORA_ROWS, ids=[row[0] for row in LORA_ROWS])
def test_lora_rule_covers_attention_blocks_and_plain_networks(model, lora, blocks, plain):
    found = {f.rule.name: f for f in match_rules(context(model).gm, load_rules("rules/lora.yaml"), context(model))}
    assert len(found["lora"].regions) == (lora or 0)
    assert len(found["lora_blocks"].regions) == (blocks or 0)
    assert len(found["lora_plain"].regions) == (plain or 0)
    assert (found["lora_blocks"].standby is None) == (lora is None)  # a fallback stands by when lora matched
    assert (found["lora_plain"].standby is None) == (lora is None and blocks is None)
    if plain:
        assert not any(r.anchor in context(model).node_ctx.feeds_output for r in found["lora_plain"].regions)


def test_match_report_counts_a_covered_rule_as_tuned_and_a_standing_by_fallback_as_not_needed():
    import io

    from rich.console import Console

    from utune_fx.match.report import match_report, render_match

    rules = load_rules("rules/lora.yaml")
    plain = match_report(context("densenet").gm, context("densenet").gm, rules, "densenet")
    assert plain["empty_rules"] == []  # lora found nothing, but its fallback did
    resnet = match_report(context("resnet").gm, context("resnet").gm, rules, "resnet")
    assert resnet["empty_rules"] == []
    out = io.StringIO()
    render_match(resnet, Console(file=out, width=200), explain=False)
    assert "rule lora_plain: lora at reparameterised on 'plain_layer'" in out.getvalue()
    assert "not needed, a fallback for rule 'lora_blocks', which matched 19 region(s)" in out.getvalue()


# transformer families whose FFN is no plain fc1 -> act -> fc2: every attention block gets its ffn
CONV_FFN_TRANSFORMERS = [("pvt", 4), ("caformer", 2)]


@pytest.mark.parametrize("model,layers", CONV_FFN_TRANSFORMERS, ids=[t[0] for t in CONV_FFN_TRANSFORMERS])
def test_transformer_patterns_find_convolutional_and_written_out_ffns(model, layers):
    assert count("attention", model) == count("ffn", model) == count("transformer_block", model) == layers


def test_caformer_mlp_with_written_out_starrelu_fires_in_conv_and_attention_blocks():
    assert count("mlp", "caformer") == 4  # the SepConv (ConvFormer) blocks' mlps too; ffn keeps the 2 with attention
    assert count("conv_mlp", "caformer") == 0


def test_conv_mlp_is_an_inverted_residual_too_but_no_ffn_without_attention():
    assert count("conv_mlp", "efficientnet") > 0
    assert count("ffn", "efficientnet") == count("mlp", "efficientnet") == 0


def test_a_relative_position_mlp_shared_by_every_block_leaves_each_attention_its_own():
    """ViT-SRelPos computes one relative-position MLP for all blocks: no graph input reaches it, so the
    attention regions may share it, and each lives and reads where its block does."""
    ctx = MatchContext(_trace_timm("vit_srelpos_small_patch16_224", 32, img_size=32, patch_size=8, depth=3))
    (found,) = [f for f in match_rules(ctx.gm, load_rules("rules/utuner_mha.yaml"), ctx) if f.rule.name == "mha"]
    assert [r.scope for r in found.regions] == [f"blocks.{i}.attn" for i in range(3)] and not found.dropped
    assert [[i.name for i in r.inputs] for r in found.regions] == [[f"blocks_{i}_norm1"] for i in range(3)]


def test_stage_changes_with_a_projected_shortcut_of_the_block_norm_are_transformer_blocks():
    """Hiera's stage-changing blocks add attn(norm1(x)) to a pooled proj(norm1(x)): the norm is the
    block's own, so the residual starts at x and the block holds its attention and its FFN."""
    ctx = MatchContext(_trace_timm("hiera_tiny_224", 224, embed_dim=32, num_heads=1, stages=(1, 1, 1, 1)))
    assert [r.scope for r in ctx.regions(PRELUDE["transformer_block"])] == [f"blocks.{i}" for i in range(4)]
    assert [r.scope for r in ctx.regions(PRELUDE["ffn"])] == [f"blocks.{i}.mlp" for i in range(4)]


class _StreamScaledFfn(nn.Module):
    """Hyper-connections (DeepSeek-V4, HY-V4): the FFN's output is scaled by a weight per token, broadcast
    over its channels. Next to it, a token-wise squeeze-excitation gate: its output scales the whole input
    it pooled."""

    def __init__(self, width=16):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.stream_weight = nn.Linear(width, 1)
        self.squeeze, self.excite = nn.Linear(width, 4), nn.Linear(4, width)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x)))) * torch.sigmoid(self.stream_weight(x))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean(1, keepdim=True)))))
        return x * gate.expand_as(x)


def test_an_mlp_scaled_by_weights_from_elsewhere_is_one_and_a_squeeze_excitation_gate_is_not():
    gm = trace(_StreamScaledFfn().eval(), torch.randn(2, 5, 16), frontend="fx")
    regions = MatchContext(gm).regions(PRELUDE["mlp"])
    assert [r.anchor.target for r in regions] == ["fc2"]
