"""The zoo sweep: the fixed CI sample through the whole chain, resuming, bounds, the report."""

import json

import pytest

from utune_fx.cli import main
from utune_fx.zoo.catalog import CI_SAMPLE
from utune_fx.zoo.report import coverage_report, render_markdown
from utune_fx.zoo.runner import done_models, sweep

TRANSFORMERS = (
    "vit_",
    "deit_",
    "beit_",
    "eva02_",
    "swin",
    "cait_",
    "pit_",
    "xcit_",
    "coat_",
    "twins_",
    "maxvit_",
    "coatnet_",
    "levit_",
    "mobilevit_",
    "efficientformer_",
    "fastvit_",
    "convit_",
    "crossvit_",
)


@pytest.mark.parametrize("name", CI_SAMPLE)
def test_the_ci_sample_runs_the_whole_chain(name, tmp_path, capsys):
    """One test per model, so pytest-xdist spreads the sample over its workers."""
    assert main(["zoo", "--models", name, "--jobs", "1", "-o", str(tmp_path), "--json"]) == 0
    rates = json.loads(capsys.readouterr().out)["pass_rates"]
    record = done_models(tmp_path / "results.jsonl")[name]
    assert record["last_stage"] == "parity", (name, record["error"])
    assert record["identity_difference"] <= 1e-5 and record["fold_difference"] <= 1e-4
    if name.startswith(TRANSFORMERS):  # the dual U-Tuner finds attention and FFN in every transformer
        assert record["found"]["mha"] > 0 and record["found"]["ffn"] > 0, (name, record["found"])
    if name == "densenet121":  # neither attention nor residual blocks: LoRA's fallback
        assert record["found"]["lora"] == 0 and record["found"]["lora_plain"] > 0, (name, record["found"])
    if name in ("resnet18", "convnext_atto"):  # residual blocks, no attention: LoRA's first fallback
        assert record["found"]["lora"] == 0 and record["found"]["lora_blocks"] > 0, (name, record["found"])
    if name == "coatnet_nano_rw_224":  # a hybrid: LoRA on the attention only
        assert record["found"]["lora"] > 0 and record["found"]["lora_blocks"] == 0, (name, record["found"])
    assert rates["parity"] == [1, 1]
    assert (tmp_path / "coverage.md").read_text().startswith("# Coverage")


def test_a_sweep_resumes_and_bounds_each_model(tmp_path):
    results = tmp_path / "results.jsonl"
    done = {"model": "resnet18", "stages": {}, "last_stage": "parity", "error": None, "found": {}}
    results.write_text(json.dumps(done) + "\n" + '{"model": "torn')  # a kill mid-line
    records = sweep(["resnet18", "vit_tiny_patch16_224"], results, jobs=1, timeout=0.5, progress=False)
    assert records["resnet18"] == done  # not run again
    assert records["vit_tiny_patch16_224"]["error"]["class"] == "Timeout"
    assert set(done_models(results)) == {"resnet18", "vit_tiny_patch16_224"}


def test_meta_models_are_counted_apart_and_causes_grouped():
    def record(name, last, meta=False, error=None):
        return {"model": name, "last_stage": last, "meta": meta, "found": {}, "stages": {}, "error": error}

    error = {"stage": "export", "class": "UtuneError", "message": "cannot export aten::foo in blocks.3"}
    records = {
        r["model"]: r
        for r in (
            record("a", "parity"),
            record("b", "rewrite", meta=True),
            record("c", "fold", error=error),
            record("d", "fold", error=dict(error, message="cannot export aten::foo in blocks.7")),
        )
    }
    report = coverage_report(records)
    assert report["pass_rates"]["rewrite"] == [4, 4] and report["pass_rates"]["parity"] == [1, 3]
    assert report["meta"] == ["b"]
    assert report["causes"] == [
        {"cause": "export: UtuneError: cannot export aten::foo in blocks.N", "count": 2, "models": ["c", "d"]}
    ]
    text = render_markdown(report, "Coverage", "preamble")
    assert "| parity | 1 | 3 | 33.3% |" in text and "trace, match and rewrite only): b." in text


def test_unknown_models_are_one_line_errors(tmp_path, capsys):
    assert main(["zoo", "--models", "vit_tiny_patch16_224,not_a_model", "-o", str(tmp_path)]) == 2
    assert "not_a_model is not a timm model" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["ci"])
def test_the_ci_sample_is_fixed_and_valid(which):
    import timm

    assert len(CI_SAMPLE) == 7 and set(CI_SAMPLE) <= set(timm.list_models())


def test_zero_initialised_weight_matrices_are_redrawn_and_named():
    """A zero classifier makes outputs all zero, a zero router makes top-k break ties (which PyTorch and
    ONNX Runtime do differently): both get random values; vectors and nonzero weights are kept."""
    import torch

    from utune_fx.zoo.stages import redraw_zero_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    kept = model[0].weight.detach().clone()
    record = {}
    redraw_zero_weights(model, record)
    assert record == {"zero_weights_redrawn": ["1.weight"]}
    assert model[1].weight.count_nonzero() == 6 and not model[1].bias.count_nonzero()
    assert torch.equal(model[0].weight, kept)
    untouched = {}
    redraw_zero_weights(model, untouched)
    assert untouched == {}


def test_another_rule_file_runs_the_chain_and_names_itself(tmp_path, capsys):
    """--rules: the bypass ladder on timm's smallest test ResNet through the chain, and the table says
    which file ran."""
    args = ["zoo", "--models", "test_resnet", "--rules", "res_tuning_bypass", "--jobs", "1", "-o", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    record = done_models(tmp_path / "results.jsonl")["test_resnet"]
    assert record["last_stage"] == "parity", record["error"]
    assert record["found"]["bypass"] > 0 and "mha" not in record["found"]
    assert record["folded"]["kept"] == record["found"]["bypass"] + 1 and "truth" not in record  # steps + a join
    assert "rule files rules/res_tuning_bypass.yaml, unchanged" in (tmp_path / "coverage.md").read_text()
