"""train --cache-features: the graph split into a frozen and a trainable part computes what the whole graph
computes (outputs and gradients, bit for bit), training from the cache ends where training without it ends,
and what caching would get wrong or not speed up is refused in one line with exit code 2."""

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import fx, nn
from torch.utils.data import TensorDataset

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.match import load_rules
from utune_fx.rewrite.artifact import TunedSource, build_tuned
from utune_fx.trace.annotate import set_training
from utune_fx.train import TrainConfig, train
from utune_fx.train.feature_cache import check_split, split_graph
from utune_fx.train.loop import freeze_frozen_norm_statistics

ROOT = Path(__file__).resolve().parents[1]
VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=4&depth=2&num_classes=4"
RESNET = "timm:resnet18?num_classes=4"  # frozen batch norms, ReLUs in place
SPLITS = [
    (VIT, "linear_probe"),
    (VIT, "dual_utuner"),
    (VIT, "lora"),
    (VIT, "res_tuning_bypass"),
    (RESNET, "utuner_block"),
    (RESNET, "res_tuning_bypass"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops contend when two threads share two busy cores (as under pytest-xdist: one each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """A CIFAR-like set: 4 classes of 32x32 noise with a bright square where the class says; 40 test images."""
    import numpy as np

    generator = np.random.default_rng(0)

    def draw(count: int) -> tuple:
        labels = np.arange(count) % 4
        pixels = generator.integers(0, 128, (count, 32, 32, 3), dtype=np.uint8)
        for index, label in enumerate(labels):
            row, column = divmod(int(label), 2)
            pixels[index, 16 * row : 16 * row + 12, 16 * column : 16 * column + 12] += 120
        return pixels, labels

    (x_train, y_train), (x_test, y_test) = draw(160), draw(40)
    path = tmp_path_factory.mktemp("images") / "squares.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def _tuned(spec: str, rules: str):
    result = build_tuned(TunedSource(spec, [], "auto"), [load_rules(ROOT / "rules" / f"{rules}.yaml")], 0)
    with torch.no_grad():  # away from the zero-initialised start, where a tuner would hide a wrong split
        for parameter in result.module.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return result.module


def _outputs_and_gradients(module, run):
    trainable = [p for p in module.parameters() if p.requires_grad]
    output = run()
    return output, torch.autograd.grad(output.square().sum(), trainable, allow_unused=True)


@pytest.mark.parametrize("spec, rules", SPLITS)
def test_the_trainable_part_on_the_frozen_features_is_the_whole_graph(spec, rules):
    module = _tuned(spec, rules)
    split = split_graph(module)
    check_split(split)
    assert not any(p.requires_grad for p in split.frozen.parameters())
    whole = dict(module.named_parameters())
    assert all(whole[name] is p for name, p in split.trainable.named_parameters())  # shared, same names
    assert {n for n, p in whole.items() if p.requires_grad} <= dict(split.trainable.named_parameters()).keys()
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):  # training: frozen batch norms in eval, as the loop runs them
        set_training(module, training)
        if training:
            freeze_frozen_norm_statistics(module)
        expected, expected_grads = _outputs_and_gradients(module, lambda: module(x))
        got, grads = _outputs_and_gradients(module, lambda: split.trainable(*split.frozen(x)))
        assert torch.equal(got, expected)  # float32, bit for bit: the same ops on the same values
        assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads) if a is not None)
        assert [g is None for g in grads] == [g is None for g in expected_grads]
    if rules == "linear_probe":  # the head reads one feature per image: that is the cache
        assert [tuple(node.meta["utune"].shape) for node in split.frontier] == [(2, 192)]


def _train(tmp_path, data: str, name: str, rules: str, *extra: str) -> Path:
    out = tmp_path / name
    argv = ["train", VIT, "--rules", rules, "--data", data, "-o", str(out), "--no-augment", "--json"]
    argv += ["--train-size", "96", "--val-size", "24", "--epochs", "2", "--batch-size", "16", "--lr", "1e-2"]
    assert main([*argv, *extra]) == 0
    return out


@pytest.mark.parametrize("rules", ["linear_probe", "res_tuning_bypass"])
def test_training_from_the_cache_ends_where_training_without_it_ends(tmp_path, images, rules, capsys):
    plain = _train(tmp_path, images, "plain", rules)
    cached = _train(tmp_path, images, "cached", rules, "--cache-features")
    assert "caching frozen features" in capsys.readouterr().err
    weights = [safetensors.torch.load_file(str(run / "tuned" / "tuners.safetensors")) for run in (plain, cached)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.allclose(weights[1][name], tensor, rtol=0, atol=1e-5), name
    assert weights[0]["head.weight"].abs().max() > 1e-3  # trained, away from its zero start
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (plain, cached)]
    for before, after in zip(*rows):
        for key in ("train_loss", "val_loss"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), key
        assert after["train_accuracy"] == before["train_accuracy"] and after["val_accuracy"] == before["val_accuracy"]
    summaries = [json.loads((run / "summary.json").read_text()) for run in (plain, cached)]
    assert summaries[1]["test_accuracy"] == summaries[0]["test_accuracy"]
    assert summaries[0]["features_cached"] is False and summaries[1]["features_cached"] is True
    assert summaries[1]["feature_cache_images"] == 96 + 24
    # per image: the head's input, 192 floats; or the ladder's: the input of block 0 and the outputs of
    # blocks 0 and 1 (65 tokens x 192), the last one read both as it is and detached but stored once
    tensors, floats = (1, 192) if rules == "linear_probe" else (3, 3 * 65 * 192)
    assert summaries[1]["feature_cache_tensors"] == tensors
    assert summaries[1]["feature_cache_bytes"] == 120 * floats * 4


def _refused(argv: list[str], capsys, after: str = "") -> str:
    """The one line of a refusal (exit 2); ``after``: what the run printed before it (the data it read)."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith(after) and err.strip().splitlines()[-1].startswith("error: "), err
    assert len(err.removeprefix(after).strip().splitlines()) == 1, err
    return err.removeprefix(after)


def test_refusals_are_one_line(tmp_path, images, capsys, monkeypatch):
    base = ["train", VIT, "--data", images, "--train-size", "40", "--epochs", "1", "--cache-features"]
    cases = [
        (["--rules", "linear_probe"], r"needs the same training images every epoch.*add --no-augment"),
        (["--rules", "bitfit", "--no-augment"], r"acts on the model's input already \(patch_embed_proj"),
    ]
    for extra, message in cases:
        assert re.search(message, _refused([*base, *extra, "-o", str(tmp_path / "a")], capsys))
    dropout = [base[0], VIT + "&drop_rate=0.1", *base[2:], "--rules", "linear_probe", "--no-augment"]
    err = _refused([*dropout, "-o", str(tmp_path / "b")], capsys)
    assert re.search(r"draws random numbers in training mode: Dropout\(p=0\.1\) head_drop", err)
    monkeypatch.setenv("UTUNE_FX_FEATURE_CACHE_BYTES", "1000")
    header = "40 training, 4 validation, 40 test images, 4 classes; 772 trainable parameters\n"
    err = _refused([*base, "--rules", "linear_probe", "--no-augment", "-o", str(tmp_path / "d")], capsys, header)
    assert re.search(
        r"the cache would take 33\.0 KiB \(44 images x 768 B of frozen features in 1 tensor\), over the limit "
        r"feature_cache_bytes \(UTUNE_FX_FEATURE_CACHE_BYTES is set\); the limit is 1,000 bytes; .* set "
        r"UTUNE_FX_FEATURE_CACHE_BYTES above 1000",
        err,
    ), err
    monkeypatch.delenv("UTUNE_FX_FEATURE_CACHE_BYTES")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: refused before any process group
    err = _refused([*base, "--rules", "linear_probe", "--no-augment", "-o", str(tmp_path / "e")], capsys)
    assert "run it without torchrun (2 processes now)" in err


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.tuner, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        y = self.backbone(x)
        y.add_(self.tuner(y))  # a trainable op writes into the frozen feature the tuner read
        return self.head(y)


def test_what_the_graph_hides_is_refused_too(tmp_path):
    net = _Net()
    for parameter in [*net.backbone.parameters(), *net.head.parameters()]:
        parameter.requires_grad_(False)
    with pytest.raises(UtuneError, match=r"add_ writes in place into the frozen value backbone"):
        check_split(split_graph(fx.symbolic_trace(net)))
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    config = TrainConfig(epochs=1, batch_size=4, cache_features=True, device="cpu")
    hidden = nn.Parameter(torch.ones(4))  # reached by a function the graph calls, not by a get_attr node

    def scaled(x):
        return x * hidden

    def noisy(x):  # random numbers drawn where the graph does not name them
        return x + torch.randn_like(x)

    for function, message in [(scaled, "the frozen feature scaled needs grad"), (noisy, "its feature noisy differs")]:
        with pytest.raises(UtuneError, match=message):
            train(_calling(function), data, None, config, tmp_path)
    with pytest.raises(UtuneError, match=r"no parameter of the model trains"):
        check_split(split_graph(fx.symbolic_trace(nn.Linear(4, 2).requires_grad_(False))))


def _calling(function) -> fx.GraphModule:
    """A frozen linear layer, then ``function``, then a trainable one."""
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    gm.get_submodule("0").requires_grad_(False)
    first = next(node for node in gm.graph.nodes if node.target == "0")
    with gm.graph.inserting_after(first):
        called = gm.graph.call_function(function, (first,))
    next(node for node in gm.graph.nodes if node.target == "1").args = (called,)
    gm.recompile()
    return gm
