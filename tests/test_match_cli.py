"""cli.py match: the dual U-Tuner rule file, unchanged, across model families."""

import json

import pytest

from utune_fx.cli import main

DUAL = "rules/dual_utuner.yaml"


def _match(capsys, *args):
    code = main(["match", *args, "--json"])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out else None), out.err


@pytest.mark.parametrize(
    "spec,extra,attention_scopes,ffn_scopes",
    [
        (
            "timm:vit_base_patch16_224",
            [],
            [f"blocks.{i}.attn" for i in range(12)],
            [f"blocks.{i}.mlp" for i in range(12)],
        ),
        (
            "timm:swin_tiny_patch4_window7_224",
            [],
            [f"layers.{s}.blocks.{b}.attn" for s, d in enumerate((2, 2, 6, 2)) for b in range(d)],
            [f"layers.{s}.blocks.{b}.mlp" for s, d in enumerate((2, 2, 6, 2)) for b in range(d)],
        ),
        (
            "timm:eva02_tiny_patch14_224?num_classes=10",
            [],
            [f"blocks.{i}.attn" for i in range(12)],
            [f"blocks.{i}.mlp" for i in range(12)],
        ),
        (
            "tests/toy_models.py:tiny_gpt",
            ["--input-shape", "2,9:int64"],
            ["h.0.attn", "h.1.attn"],
            ["h.0.mlp", "h.1.mlp"],
        ),
    ],
)
def test_dual_utuner_rule_file_across_models(capsys, spec, extra, attention_scopes, ffn_scopes):
    code, report, err = _match(capsys, spec, "--rules", DUAL, *extra)
    assert code == 0, err
    mha, ffn, classifier = report["results"]
    assert [r["scope"] for r in mha["regions"]] == attention_scopes
    assert [r["scope"] for r in ffn["regions"]] == ffn_scopes
    if "gpt" in spec:  # a language model's head predicts tokens: it stays frozen, as in PEFT
        assert not classifier["regions"] and "language model" in classifier["standby"]
    else:
        assert len(classifier["regions"]) == 1
    for region in mha["regions"] + ffn["regions"]:
        channels = region["out_shape"][-1]
        assert region["added_parameters"] == 2 * 8 * channels + 8 + channels  # hidden 8, zero-free count


def test_text_output_lists_24_regions_for_vit_base(capsys):
    assert main(["match", "timm:vit_base_patch16_224", "--rules", DUAL]) == 0
    text = capsys.readouterr().out
    assert "rule mha: parallel_adapter at parallel on 'attention'" in text
    assert "12 region(s), +156,768 parameters" in text
    assert text.count("blocks.") >= 24 and "total: 25 region(s)" in text


def test_rule_matching_nothing_exits_3_and_explains(capsys):
    code, report, err = _match(capsys, "timm:resnet18", "--rules", DUAL, "--input-shape", "2,3,64,64")
    assert code == 3
    assert report["empty_rules"] == ["mha", "ffn"]
    assert err.startswith("error: rule(s) mha, ffn in rules/dual_utuner.yaml match nothing in timm:resnet18")
    assert "no attn: closest: node" in report["results"][0]["near_miss"]
    assert main(["match", "timm:resnet18", "--rules", DUAL, "--input-shape", "2,3,64,64", "--allow-empty"]) == 0
    capsys.readouterr()
    assert (
        main(["match", "timm:resnet18", "--rules", DUAL, "--input-shape", "2,3,64,64", "--explain", "--allow-empty"])
        == 0
    )
    assert "matches nothing" in capsys.readouterr().out


def test_bad_rule_file_is_one_located_line_before_any_model_is_built(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - {name: r, match: attention, tuner: lora, settings: {rank: -1}}\n")
    assert main(["match", "timm:no_such_model", "--rules", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:3:") and "rank must be a positive integer" in err
    assert err.count("\n") == 1
