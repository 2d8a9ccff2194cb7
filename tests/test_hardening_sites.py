"""`match` is the dry run of `rewrite` (issue 15): both run the same site checks, size bounds and memory
estimate and fail with the same line; both exit 3 on a rule that matches nothing (--allow-empty on both);
fold and ONNX parity refuse outputs that are not finite and flag all-zero ones as uninformative."""

import json
import math

import pytest
import torch
from torch import nn

import utune_fx  # noqa: F401  (before timm)
from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.export import export_onnx, verify_onnx
from utune_fx.fold import fold, folded_difference, relative_difference
from utune_fx.match import load_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite import rewrite
from utune_fx.rewrite.plan import site_refusal
from utune_fx.trace import trace

VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&num_classes=10"
RESNET = ["timm:resnet18", "--input-shape", "2,3,32,32"]


def _rules(tmp_path, body: str, name: str = "rules.yaml") -> str:
    path = tmp_path / name
    path.write_text("version: 1\nrules:\n" + body)
    return str(path)


def _rule_set(tmp_path, body: str):
    return load_rules(_rules(tmp_path, body))


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _match_and_rewrite(capsys, tmp_path, model: list[str], rules: str, *flags: str):
    """(match's exit code and stderr, rewrite's exit code and stderr, whether rewrite wrote its artifact)."""
    matched = _run(capsys, "match", *model, "--rules", rules, *flags)
    out = tmp_path / "tuned"
    rewritten = _run(capsys, "rewrite", *model, "--rules", rules, "-o", str(out), *flags)
    return (matched[0], matched[2]), (rewritten[0], rewritten[2]), (out / "manifest.json").is_file()


def test_match_refuses_what_rewrite_refuses_with_the_same_line(capsys, tmp_path):
    rules = _rules(tmp_path, "  - {name: lora_attn, match: attention, tuner: lora}\n")
    (code, err), (rewrite_code, rewrite_err), written = _match_and_rewrite(capsys, tmp_path, [VIT], rules)
    assert code == rewrite_code == 2 and not written
    assert err == rewrite_err and err.count("\n") == 1
    assert "rule 'lora_attn'" in err and "region blocks.0.attn" in err and "the region holds 2" in err
    code, out, _ = _run(capsys, "match", VIT, "--rules", rules, "--json")
    report = json.loads(out)
    assert code == 2 and len(report["refusals"]) == 2 and report["refusal"] == report["refusals"][0]
    assert all("the region holds 2" in region["refused"] for region in report["results"][0]["regions"])


def test_a_tuner_on_every_node_is_a_clean_refusal_in_both(capsys, tmp_path):
    rules = _rules(tmp_path, "  - {name: every, match: {node: {}}, tuner: parallel_adapter}\n")
    (code, err), (rewrite_code, rewrite_err), written = _match_and_rewrite(capsys, tmp_path, [VIT], rules)
    assert code == rewrite_code == 2 and err == rewrite_err and not written
    assert err.startswith("error: rule 'every'") and "Traceback" not in err


@pytest.mark.parametrize(
    "tuner,reason",
    [("prefix", "nn.MultiheadAttention"), ("parallel_adapter", "the tuner needs tensors in and out")],
)
def test_a_module_attention_is_refused_by_the_dry_run_as_by_rewrite(tmp_path, tuner, reason):
    class Block(nn.Module):  # torchvision's ViT: nn.MultiheadAttention returns (output, weights)
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            y, _ = self.attn(x, x, x, need_weights=False)
            return self.fc(x + y)

    model, x = Block(), torch.randn(2, 5, 16)
    rules = _rule_set(tmp_path, f"  - {{name: mha, match: attention, tuner: {tuner}}}\n")
    gm = trace(model, (x,), frontend="fx")  # auto would take torch.export, which sees inside the module
    report = match_report(gm, model, rules, "block", site_refusal)
    assert report["refusals"] and reason in report["refusals"][0]
    with pytest.raises(UtuneError) as refused:
        rewrite(trace(model, (x,), frontend="fx"), rules)
    assert str(refused.value) == report["refusals"][0]


def test_an_empty_rule_exits_3_in_both_and_allow_empty_writes_the_artifact(capsys, tmp_path):
    rules = "rules/dual_utuner.yaml"
    (code, err), (rewrite_code, rewrite_err), written = _match_and_rewrite(capsys, tmp_path, RESNET, rules)
    assert code == rewrite_code == 3 and err == rewrite_err and not written
    assert err.startswith("error: rule(s) mha, ffn in rules/dual_utuner.yaml match nothing in timm:resnet18;")
    assert "--allow-empty" in err and err.count("\n") == 1
    (code, _), (rewrite_code, _), written = _match_and_rewrite(capsys, tmp_path, RESNET, rules, "--allow-empty")
    assert code == rewrite_code == 0 and written


def test_train_with_rules_exits_3_on_an_empty_rule_as_match_and_rewrite_do(capsys, tmp_path):
    rules = "rules/dual_utuner.yaml"
    _, (_, rewrite_err), _ = _match_and_rewrite(capsys, tmp_path, RESNET, rules)
    out = tmp_path / "run"
    code, _, err = _run(capsys, "train", *RESNET, "--rules", rules, "--data", "digits", "-o", str(out))
    assert code == 3 and err.splitlines()[-1] == rewrite_err.strip()
    assert not (out / "metrics.jsonl").exists() and not (out / "tuned").exists()


@pytest.mark.parametrize(
    "rule,bound",
    [
        (
            "{name: big, match: mlp, tuner: parallel_adapter, settings: {hidden: 5000}}",
            "hidden 5000 is far above the region's channels: at most max(4 x 192, 64) = 768",
        ),
        (
            "{name: big, match: {node: {kind: linear, scope: 'blocks.0.attn.qkv'}}, tuner: lora, "
            "settings: {rank: 5000}}",
            "rank 5000 is far above the layer's widths (192 in, 576 out): at most max(4 x 576, 64) = 2304",
        ),
        (
            "{name: big, match: attention, tuner: prefix, settings: {length: 5000}}",
            "length 5000 is far above the 17 token(s) the region reads: at most max(4 x tokens, 256) = 256",
        ),
    ],
)
def test_sizes_far_above_the_region_are_refused_with_the_bound_by_both(capsys, tmp_path, rule, bound):
    rules = _rules(tmp_path, f"  - {rule}\n")
    (code, err), (rewrite_code, rewrite_err), written = _match_and_rewrite(capsys, tmp_path, [VIT], rules)
    assert code == rewrite_code == 2 and err == rewrite_err and not written
    assert bound in err and err.startswith("error: rule 'big'")


def test_tuners_the_machine_cannot_hold_are_refused_with_the_figure_before_allocating(capsys, tmp_path, monkeypatch):
    rules = _rules(
        tmp_path,
        "  - {name: mha, match: attention, tuner: parallel_adapter, settings: {hidden: 768}}\n"
        "  - {name: mlp, match: mlp, tuner: parallel_adapter, settings: {hidden: 768}}\n",
    )
    # room for the model itself (about 4 MB of weights, checked when it is built), not for its tuners
    monkeypatch.setattr("utune_fx.rewrite.plan.available_memory", lambda: 6_000_000)

    def allocate(*args, **kwargs):
        raise AssertionError("rewrite allocated tuners past the memory check")

    monkeypatch.setattr("utune_fx.rewrite.apply_rule", allocate)
    (code, err), (rewrite_code, rewrite_err), written = _match_and_rewrite(capsys, tmp_path, [VIT], rules)
    assert code == rewrite_code == 2 and err == rewrite_err and not written
    # 4 regions x (192 * 768 + 768 + 768 * 192 + 192) parameters, float32
    assert "the tuners would add 1,183,488 parameters = 4.5 MiB (4 bytes each), more than 50% of the 5.7 MiB" in err
    assert "rule 'mha'" in err and "adds 591,744" in err


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _tuned_mlp(tmp_path):
    torch.manual_seed(0)
    model, x = _Mlp(), torch.randn(3, 8)
    rules = _rule_set(tmp_path, "  - {name: lora, match: {node: {kind: linear}}, tuner: lora, settings: {rank: 2}}\n")
    return rewrite(trace(model, (x,)), rules), (x,)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_fold_refuses_outputs_that_are_not_finite(tmp_path, value):
    result, x = _tuned_mlp(tmp_path)
    with torch.no_grad():
        result.module.get_submodule("utune.lora.1").lora_B.weight.fill_(value)
    folded = fold(result.module, result.summaries)
    with pytest.raises(UtuneError, match="the tuned model's outputs on the example inputs hold .* NaN and"):
        folded_difference(result.module, folded.module, x)
    assert relative_difference(result.module(*x), folded.module(*x)) == math.inf  # never under a tolerance


def test_fold_flags_an_all_zero_output_as_uninformative(tmp_path):
    result, x = _tuned_mlp(tmp_path)
    with torch.no_grad():
        result.module.fc2.weight.zero_()
        result.module.fc2.bias.zero_()
    folded = fold(result.module, result.summaries)
    warnings: list[str] = []
    assert folded_difference(result.module, folded.module, x, warnings) == 0.0
    assert len(warnings) == 1 and "all zero" in warnings[0] and "says nothing" in warnings[0]


def test_onnx_parity_refuses_nan_against_nan(tmp_path):
    model, x = _Mlp(), (torch.randn(2, 8),)
    with torch.no_grad():
        model.fc2.bias.fill_(math.nan)
    path = tmp_path / "nan.onnx"
    with pytest.raises(UtuneError) as refused:
        export_onnx(model, x, path, exporter="torchscript")
    message = str(refused.value)
    assert "PyTorch's output 0 at batch 1 holds 4 NaN and 0 infinite of 4 values" in message
    assert "\n" not in message and not path.exists()
    export_onnx(_Mlp(), x, path, exporter="torchscript")
    with pytest.raises(UtuneError, match="PyTorch's output 0 at batch 1 holds"):
        verify_onnx(path, model, x)


def test_onnx_parity_flags_an_all_zero_output(tmp_path):
    model, x = _Mlp(), (torch.randn(2, 8),)
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.zero_()
    parity = export_onnx(model, x, tmp_path / "zero.onnx", exporter="torchscript").parity
    assert parity.passed and all(check.uninformative for check in parity.checks)
    assert parity.warnings and "all zero at batch 1, 4" in parity.warnings[0]
    assert "warning:" in parity.summary()


def test_the_estimate_counts_what_rewrite_adds_on_norms_of_feature_maps(tmp_path):
    """The memory estimate is only as good as the count: a BatchNorm region's channels are axis 1."""
    from utune_fx.specs import load_model

    loaded = load_model("timm:resnet18", ["2,3,32,32"])
    rules = _rule_set(tmp_path, "  - {name: bn, match: {node: {kind: norm}}, tuner: sequential_adapter}\n")
    gm = trace(loaded.model, loaded.inputs)
    estimate = match_report(gm, loaded.model, rules, "resnet18", site_refusal)["added_parameters"]
    added = rewrite(gm, rules).summaries[0].added_parameters
    assert estimate == added == sum(2 * 8 * c + 8 + c for c in [64] * 5 + [128] * 5 + [256] * 5 + [512] * 5)


def test_rewrite_allow_empty_with_a_prompt_rule_that_matches_nothing_writes_the_artifact(capsys, tmp_path):
    out = tmp_path / "tuned"
    code, _, err = _run(
        capsys, "rewrite", *RESNET, "--rules", "rules/vpt_shallow.yaml", "-o", str(out), "--allow-empty"
    )
    assert code == 0, err
    assert (out / "manifest.json").is_file()


def test_the_shipped_rank_stays_allowed_on_narrow_layers(capsys):
    """CaiT's talking-heads projections are as wide as its heads (4): rank 8 is not far above them."""
    cait = "timm:cait_xxs24_224?img_size=32&patch_size=8&depth=1&depth_token_only=1&num_classes=10"
    code, _, err = _run(capsys, "match", cait, "--rules", "rules/lora.yaml")
    assert code == 0, err
