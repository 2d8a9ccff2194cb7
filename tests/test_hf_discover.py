"""The discovered half of the transformers catalogue (utune_fx/zoo/hf_discover.py): the generic shrink
table on real default configs, the shipped hf_discovered.json (schema, names, entries the zoo can
select and build), a damaged file refused in one line, and the isolation of one model type."""

import itertools
import json
import os
import signal
import time

import pytest
import transformers

import utune_fx  # noqa: F401  (before transformers, torchvision)
from utune_fx.errors import UtuneError
from utune_fx.zoo import hf_discover
from utune_fx.zoo.catalogs import build_entry, entry_spec, select_models
from utune_fx.zoo.hf_catalog import HF_MODELS, hf_models, read_discovered, spec_model_type

SHIPPED = read_discovered()
DISCOVERED = {name: entry for name, entry in SHIPPED["models"].items() if "spec" in entry}
EXCLUDED_EXAMPLE = "llava"  # built, but its forward wants image tokens in the text: the spec has none


def test_shrink_sets_the_fields_each_config_has():
    bart = hf_discover.shrink_options(transformers.AutoConfig.for_model("bart"))
    assert {k: bart[k] for k in ("d_model", "encoder_layers", "decoder_attention_heads", "encoder_ffn_dim")} == {
        "d_model": 32,
        "encoder_layers": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
    }
    assert "hidden_size" not in bart and "num_hidden_layers" not in bart  # BART spells them otherwise
    gpt2 = hf_discover.shrink_options(transformers.AutoConfig.for_model("gpt2"))
    assert {k: gpt2[k] for k in ("n_embd", "n_layer", "n_head", "vocab_size")} == {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": 1000,
    }
    assert gpt2["bos_token_id"] == gpt2["eos_token_id"] == 999  # 50256, moved inside the vocabulary, still one id


def test_shrink_reaches_lists_and_sub_configs_and_never_grows():
    swin = hf_discover.shrink_options(transformers.AutoConfig.for_model("swin"))
    assert swin["depths"] == [1, 1, 1, 1] and swin["num_heads"] == [2, 2, 2, 2] and swin["image_size"] == 32
    assert "patch_size" not in swin  # 4 already, below the table's 8
    clip = hf_discover.shrink_options(transformers.AutoConfig.for_model("clip"))
    assert clip["text_config.hidden_size"] == clip["vision_config.hidden_size"] == 32
    assert clip["vision_config.patch_size"] == 8 and clip["text_config.vocab_size"] == 1000
    assert "hidden_size" not in clip  # the composite config has none of its own


def test_the_shipped_file_validates_and_covers_every_type_but_the_curated(tmp_path):
    assert SHIPPED["transformers"] == transformers.__version__
    curated = {spec_model_type(spec) for spec in HF_MODELS.values()}
    registered, with_base = hf_discover.registered_model_types()
    assert (SHIPPED["registered"], SHIPPED["with_base_model"]) == (len(registered), len(with_base))
    assert set(SHIPPED["models"]) == set(registered) - curated
    assert len(DISCOVERED) >= 100
    for name, entry in SHIPPED["models"].items():
        if "excluded" in entry:
            assert entry["excluded"].partition(":")[0] in hf_discover.KINDS, name
    hf_discover.write_discovered(SHIPPED, tmp_path / "again.json")  # the writer checks the schema too
    assert json.loads((tmp_path / "again.json").read_text()) == SHIPPED


def test_a_discovered_entry_goes_through_the_zoo_selection_and_build():
    names = list(hf_models())
    assert names[: len(HF_MODELS)] == list(HF_MODELS) and set(DISCOVERED) <= set(names[len(HF_MODELS) :])
    assert select_models("transformers", "all") == names
    name = "roberta-prelayernorm" if "roberta-prelayernorm" in DISCOVERED else sorted(DISCOVERED)[0]
    assert select_models("transformers", name) == [name]
    assert entry_spec("transformers", name) == DISCOVERED[name]["spec"]
    record = {}
    model, inputs, expected = build_entry("transformers", name, record)
    assert expected == DISCOVERED[name]["expected"] and record["spec"] == DISCOVERED[name]["spec"]
    model(*inputs)


@pytest.mark.parametrize(
    "damage,field",
    [
        (lambda content: content["models"]["roberta-prelayernorm"].update(spec=5), "models.roberta-prelayernorm"),
        (lambda content: content.pop("transformers"), "(top level)"),
        (lambda content: content["models"].update(mt5={"excluded": ""}), "models.mt5"),
        (lambda content: content["models"].update(mt5={"spec": "hf:gpt2?n_layer=2", "expected": {}}), "models.mt5"),
        (lambda content: content["models"].update(mt5={"spec": "hf:gpt2", "expected": _counts()}), "models.mt5.spec"),
    ],
)
def test_a_damaged_file_fails_in_one_line_naming_file_and_field(tmp_path, damage, field):
    content = json.loads(hf_discover.DISCOVERED_JSON.read_text())
    content["models"].setdefault("roberta-prelayernorm", {"spec": "hf:roberta-prelayernorm", "expected": _counts()})
    damage(content)
    path = tmp_path / "hf_discovered.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UtuneError) as raised:
        read_discovered(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}: {field}"), message


def _counts():
    return {"self_attention": 2, "cross_attention": 0, "ffn": 2}


def test_one_model_type_cannot_hang_or_kill_the_run(monkeypatch):
    """run_isolated forks: each child runs check_model_type as patched here, under its limits."""
    behaviours = {
        "hangs": lambda: time.sleep(60),
        "spins": lambda: sum(itertools.count()),
        "dies": lambda: os.kill(os.getpid(), signal.SIGKILL),
        "raises": lambda: 1 / 0,
        "passes": lambda: {"spec": "hf:passes", "expected": _counts()},
    }
    monkeypatch.setattr(hf_discover, "check_model_type", lambda name: behaviours[name]())
    monkeypatch.setattr(hf_discover, "WALL_FACTOR", 8)
    start = time.perf_counter()
    results = dict(hf_discover.run_isolated(list(behaviours), jobs=len(behaviours), time_limit=1))
    assert time.perf_counter() - start < 20
    assert results["hangs"] == {"excluded": "time limit: not done within 8 s (wall clock)"}
    assert results["spins"]["excluded"].startswith("time limit: ")  # CPU seconds, or the clock on a busy machine
    assert results["dies"] == {"excluded": "crash: the process died with exit code -9 (negative: signal)"}
    assert results["raises"] == {"excluded": "crash: ZeroDivisionError: division by zero"}
    assert results["passes"] == {"spec": "hf:passes", "expected": _counts()}


def test_check_model_type_gives_what_the_file_holds():
    for name in ("roberta-prelayernorm", EXCLUDED_EXAMPLE):
        assert hf_discover.check_model_type(name) == SHIPPED["models"][name], name
