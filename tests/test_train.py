"""Training: only trainable parameters change, frozen batch-norm statistics stay,
checkpoints resume to the same weights after a real SIGINT, settings are validated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch.utils.data import TensorDataset

from utune_fx.errors import UtuneError
from utune_fx.match import load_rules
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace
from utune_fx.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def _toy_task(n=64, classes=4):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return TensorDataset(x, y % classes)


def test_only_tuner_parameters_change_and_frozen_batch_norm_statistics_stay(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).eval()
    data = _toy_task()
    result = rewrite(trace(model, data.tensors[0][:2]), load_rules(ROOT / "rules" / "utuner_block.yaml"))
    before = {k: v.clone() for k, v in result.module.state_dict().items()}
    train(result.module, data, data, TrainConfig(epochs=1, batch_size=16, lr=1e-2), tmp_path)
    after = result.module.state_dict()
    trainable = {n for n, p in result.module.named_parameters() if p.requires_grad}
    changed = {k for k in before if not torch.equal(before[k], after[k].cpu())}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]  # running_mean/var included in the check
    assert any(k.startswith("utune.") for k in changed)


def test_settings_are_checked():
    with pytest.raises(UtuneError, match=r"--optimizer must be one of adamw, sgd, got 'adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(UtuneError, match=r"--epochs must be a positive integer, got 0"):
        TrainConfig(epochs=0)


_SCRIPT = """
import utune_fx  # first: it makes torchvision importable with CPU torch
import sys, time, torch, timm
from pathlib import Path
from torch.utils.data import TensorDataset
sys.path.insert(0, {tests!r})
from test_train import _toy_task
from utune_fx.match import load_rules
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace
from utune_fx.train import TrainConfig, train

class Slow(TensorDataset):  # slow enough for the parent to interrupt mid-run
    def __getitem__(self, i):
        time.sleep(float(sys.argv[3]))
        return super().__getitem__(i)

data = _toy_task()
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4,
                          drop_rate=0.1).eval()
result = rewrite(trace(model, data.tensors[0][:2]), load_rules({rules!r}))
train(result.module, Slow(*data.tensors), data, TrainConfig(epochs=3, batch_size=8, lr=1e-2, accumulate=2),
      Path(sys.argv[1]), resume=sys.argv[2] == "resume")
"""


def test_a_run_interrupted_by_sigint_resumes_to_the_same_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests"), rules=str(ROOT / "rules" / "dual_utuner.yaml")))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run([sys.executable, str(script), str(straight), "fresh", "0"], check=True, env=env, capture_output=True)
    child = subprocess.Popen(
        [sys.executable, str(script), str(broken), "fresh", "0.01"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (broken / "metrics.jsonl").exists() and time.time() < deadline:  # interrupt during epoch 2
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=120)
    assert child.returncode != 0, "the run was not interrupted"
    state = json.loads((broken / "checkpoint" / "state.json").read_text())["progress"]
    assert state["epoch"] == 1 and 0 < state["step"] < 4, state  # mid-epoch, at a step boundary
    subprocess.run([sys.executable, str(script), str(broken), "resume", "0"], check=True, env=env, capture_output=True)
    first = safetensors.torch.load_file(str(straight / "checkpoint" / "tensors.safetensors"))
    second = safetensors.torch.load_file(str(broken / "checkpoint" / "tensors.safetensors"))
    weights = [k for k in first if k.startswith("model.")]
    assert weights and all(torch.equal(first[k], second[k]) for k in weights)
    assert [json.loads(line)["val_accuracy"] for line in (straight / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(line)["val_accuracy"] for line in (broken / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_diverging_run_stops_with_the_step_and_the_learning_rate(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=4).eval()
    data = _toy_task()
    result = rewrite(trace(model, data.tensors[0][:2]), load_rules(ROOT / "rules" / "full_finetune.yaml"))
    with pytest.raises(
        UtuneError,
        match=r"the training loss is (nan|inf) at epoch \d+, step \d+: training diverged; "
        r"lower --lr \(now 1e\+12\)",
    ):
        train(result.module, data, data, TrainConfig(epochs=3, lr=1e12, warmup_epochs=0, clip_grad=0), tmp_path)
