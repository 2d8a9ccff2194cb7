"""Training runs are strict on resume, safe against a second writer and kills, and check devices first.

Each test stands for a failure the probe of issue 15 found: --resume silently taking another batch
size, lr or seed; hand-edited checkpoints accepted or read into tracebacks; two runs writing one
directory; a swap killed between its renames leaving a run that neither --resume nor a fresh run
accepts; tuned/ at another epoch than its summary; --device cuda failing late with an AssertionError.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from utune_fx import atomic
from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SPEC = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=1&num_classes=10&global_pool=avg"
FAST = ["--train-size", "64", "--val-size", "16", "--no-augment", "--batch-size", "16"]


def _train(out: Path, *extra: str) -> int:
    argv = ["train", SPEC, "--rules", str(ROOT / "rules" / "dual_utuner.yaml"), "--data", "digits", "-o", str(out)]
    return main([*argv, *FAST, *extra])


def _one_error_line(capsys, pattern: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in "".join(lines), lines
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of one epoch; tests copy it before they damage or extend it."""
    out = tmp_path_factory.mktemp("resume") / "run"
    assert _train(out, "--epochs", "1") == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# 1. --resume holds to the run's settings


def test_resume_refuses_settings_that_change_the_run_naming_old_and_new_values(run, capsys):
    assert _train(run, "--resume", "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--seed", "3") == 2
    _one_error_line(capsys, r"--batch-size 16 \(now 8\), --lr 0\.001 \(now 0\.01\), --seed 0 \(now 3\)")
    assert _train(run, "--resume", "--epochs", "1", "--train-size", "48") == 2
    _one_error_line(capsys, r"--train-size 64 \(now 48\)")


def test_resume_applies_more_epochs_and_another_device_and_says_so(run, capsys):
    assert _train(run, "--resume", "--epochs", "2", "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "--epochs 1 -> 2" in err and "--device auto -> cpu" in err, err
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert _train(run, "--resume", "--epochs", "1") == 2
    _one_error_line(capsys, r"has trained 2 epochs already; pass --epochs 2 or more")


# checkpoint/state.json and tensors.safetensors are checked before anything is restored


def _edit_state(run: Path, edit) -> None:
    path = run / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _edit_tensors(run: Path, edit) -> None:
    path = run / "checkpoint" / "tensors.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(path))


def _replace_by_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)  # reading it would wait for a writer forever


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: _edit_state(r, lambda s: s["progress"].update(epoch=-1)), r"progress\.epoch: -1 is less than"),
        (lambda r: _edit_state(r, lambda s: s["progress"].update(step=10**15)), r"progress\.step: 10+ is greater"),
        (lambda r: _edit_state(r, lambda s: s["progress"].update(step=4)), r"progress\.step 4 is beyond the 4"),
        (lambda r: _edit_state(r, lambda s: s["progress"].update(epoch="1")), r"progress\.epoch: '1' is not of type"),
        (lambda r: _edit_state(r, lambda s: s.pop("progress")), r"'progress' is a required property"),
        (lambda r: _edit_state(r, lambda s: s["rng"].pop("numpy")), r"rng: 'numpy' is a required property"),
        (lambda r: _edit_state(r, lambda s: s["schedule"].update(last_epoch=1)), r"schedule\.last_epoch is 1"),
        (lambda r: (r / "checkpoint" / "state.json").write_text("{"), r"state\.json: not valid JSON"),
        (
            lambda r: _edit_state(r, lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=0.5)),
            r"optimizer\.param_groups\[0\]\.weight_decay is 0\.5, the run's settings give 0\.05",
        ),
        (
            lambda r: _edit_state(r, lambda s: s["optimizer"]["param_groups"][0]["params"].reverse()),
            r"params must number the parameters 0, 1, 2, \.\.\. in order",
        ),
        (lambda r: _edit_tensors(r, lambda t: t.pop("rng.torch")), r"rng\.torch is missing"),
        (lambda r: _edit_tensors(r, lambda t: t.pop("optim.0.exp_avg")), r"optim\.0\.exp_avg is missing"),
        (lambda r: _edit_tensors(r, lambda t: t.update({"rng.numpy": torch.zeros(3)})), r"rng\.numpy is not"),
        (
            lambda r: _edit_tensors(r, lambda t: t.update({"optim.0.exp_avg": torch.zeros(1)})),
            r"optim\.0\.exp_avg has shape \[1\]",
        ),
        (lambda r: (r / "checkpoint" / "tensors.safetensors").write_bytes(b"\0" * 9), r"not a readable safetensors"),
        (
            lambda r: _replace_by_fifo(r / "checkpoint" / "tensors.safetensors"),
            r"tensors\.safetensors is not a regular",
        ),
        (lambda r: _replace_by_fifo(r / "checkpoint" / "state.json"), r"state\.json is not a regular file"),
        (lambda r: (r / "checkpoint" / "state.json").unlink(), r"state\.json is missing"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_field(run, capsys, damage, message):
    damage(run)
    assert _train(run, "--resume", "--epochs", "2") == 2
    _one_error_line(capsys, message)


# 2. one writer per run directory


_HOLD_LOCK = """
import fcntl, os, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.ftruncate(descriptor, 0)  # as hold_lock does: a longer pid written before must not show through
os.write(descriptor, str(os.getpid()).encode())
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(out, "--epochs", "1") == 2
        _one_error_line(capsys, rf"{re.escape(str(out))} is in use by another training run \(process {holder.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # refused before any work
    finally:
        holder.kill()  # as kill -9 does: the kernel drops its lock
        holder.wait()
    assert _train(out, "--epochs", "1") == 0


def test_a_run_is_not_read_while_a_training_run_writes_it(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["eval", str(run), "--data", "digits"]) == 2
        _one_error_line(capsys, rf"is being written by a training run \(process {holder.pid} holds")
    finally:
        holder.kill()
        holder.wait()
    assert main(["eval", str(run), "--data", "digits", "--json"]) == 0


# 3. a swap killed at any point leaves the old or the new result, and the next command recovers


_KILLED_SWAP = """
import os, sys
from pathlib import Path
from utune_fx import atomic
exchange = sys.argv[2] == "exchange"
if not exchange:
    atomic._exchange = lambda first, second: False  # a file system that cannot exchange: two renames
calls = []
def rename_then_die(source, target):
    calls.append(source)
    if len(calls) == (1 if exchange else 2):
        os._exit(9)  # killed at the step under test, no clean-up runs
    os.replace(source, target)
atomic._rename = rename_then_die
with atomic.replace_directory(Path(sys.argv[1])) as staging:
    (staging / "result.txt").write_text("new")
"""


@pytest.mark.parametrize("mode", ["exchange", "two renames"])
def test_a_swap_killed_between_its_steps_leaves_the_old_or_the_new_result(tmp_path, mode):
    target = tmp_path / "result"
    with atomic.replace_directory(target) as staging:
        (staging / "result.txt").write_text("old")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SWAP, str(target), mode], env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert killed.returncode == 9
    if mode == "exchange":
        assert (target / "result.txt").read_text() == "new"  # never missing, even at the kill
    atomic.recover_directory(target, stale_staging=True)
    assert (target / "result.txt").read_text() == ("new" if mode == "exchange" else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]  # nothing set aside or half-written is left
    with atomic.replace_directory(target) as staging:
        (staging / "result.txt").write_text("next")
    assert (target / "result.txt").read_text() == "next"


def test_a_run_whose_checkpoint_swap_was_killed_resumes(run, capsys):
    # what a kill between the two renames leaves: the checkpoint set aside, a half-written new one
    os.replace(run / "checkpoint", run / ".checkpoint.old")
    (run / ".checkpoint.staging.x1y2").mkdir()
    (run / ".checkpoint.staging.x1y2" / "tensors.safetensors").write_bytes(b"half")
    assert _train(run, "--epochs", "1") == 2
    _one_error_line(capsys, r"holds an earlier run; pass --resume")
    assert _train(run, "--resume", "--epochs", "2") == 0
    assert json.loads((run / "checkpoint" / "state.json").read_text())["progress"]["epoch"] == 2
    assert not any(p.name.startswith(".checkpoint.") for p in run.iterdir())


# 4. tuned/, checkpoint/ and summary.json agree, or the reader is told to finish the run


@pytest.mark.parametrize("killed_at", ["before tuned/", "before summary.json"])
def test_a_run_killed_while_finishing_is_refused_by_readers_and_finished_by_resume(run, capsys, monkeypatch, killed_at):
    import utune_fx.train.loop as loop
    import utune_fx.train.session as session

    class Killed(Exception):
        pass

    def die(*args, **kwargs):
        raise Killed

    if killed_at == "before tuned/":
        monkeypatch.setattr(session, "save_tuned", die)
    else:
        write_text = loop.write_text
        monkeypatch.setattr(loop, "write_text", lambda p, t: die() if p.name == "summary.json" else write_text(p, t))
    with pytest.raises(Killed):
        _train(run, "--resume", "--epochs", "2")
    monkeypatch.undo()
    capsys.readouterr()
    for reader in (
        ["eval", str(run), "--data", "digits"],
        ["fold", str(run), "-o", str(run.parent / "folded")],
        ["export", str(run), "-o", str(run.parent / "model.onnx")],
    ):
        assert main(reader) == 2, reader
        _one_error_line(capsys, r"the run stopped before it finished; finish it with .*--resume")
    assert not (run.parent / "folded").exists() and not (run.parent / "model.onnx").exists()
    assert _train(run, "--resume", "--epochs", "2") == 0
    assert main(["eval", str(run), "--data", "digits", "--json"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


# 5. devices are checked before any work


def test_an_unusable_device_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _train(tmp_path / "a", "--device", "cuda") == 2
    _one_error_line(capsys, r"--device cuda: this machine has no usable CUDA device.*use --device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _train(tmp_path / "b", "--device", "cuda:2") == 2
    _one_error_line(capsys, r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)")
    assert _train(tmp_path / "c", "--device", "gpu") == 2
    _one_error_line(capsys, r"--device must be auto, cpu, cuda or cuda:N, got 'gpu'")
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing built, read or written
    assert TrainConfig(device="cuda:1").device == "cuda:1" and TrainConfig(device="cuda").device == "cuda"
    with pytest.raises(UtuneError, match=r"cuda:2"):
        TrainConfig(device="cuda:2")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lr": float("inf")}, r"--lr must be a finite number, got inf"),
        ({"clip_grad": float("nan")}, r"--clip-grad must be a finite number, got nan"),
        ({"seed": 10**30}, r"--seed must be an integer of at most 4294967295"),
        ({"workers": 10**6}, r"--workers must be an integer of at most 256"),
        ({"epochs": 10**7}, r"--epochs must be an integer of at most 1000000"),
    ],
)
def test_training_numbers_are_finite_and_bounded(setting, message):
    with pytest.raises(UtuneError, match=message):
        TrainConfig(**setting)


def test_rule_files_are_hashed_only_when_they_are_regular_files(tmp_path):
    from utune_fx.train.rundir import file_sha256

    (tmp_path / "rules.yaml").write_text("version: 1\n")
    assert file_sha256(tmp_path / "rules.yaml") == hashlib.sha256(b"version: 1\n").hexdigest()
    assert file_sha256("/dev/zero") is None  # not read (it never ends); load_rules refuses it in one line
    assert file_sha256(tmp_path / "missing.yaml") is None and file_sha256("a\0b") is None


def test_an_artifact_named_by_another_path_is_the_same_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["rewrite", SPEC, "--rules", str(ROOT / "rules" / "dual_utuner.yaml"), "-o", "artifact"]) == 0
    argv = ["--data", "digits", "-o", "run", *FAST]
    assert main(["train", "artifact", *argv, "--epochs", "1"]) == 0
    assert main(["train", str(tmp_path / "artifact"), *argv, "--epochs", "1", "--resume"]) == 0
    assert main(["train", SPEC, "--rules", str(ROOT / "rules" / "dual_utuner.yaml"), *argv, "--resume"]) == 2
    _one_error_line(capsys, r"MODEL \S+artifact \(now timm:vit_tiny")


def test_the_writer_of_a_run_is_not_refused_as_its_reader(run):
    from utune_fx.train.rundir import check_run_result, hold_lock

    (run / "summary.json").unlink()  # as a run stopped while finishing leaves it
    with pytest.raises(UtuneError, match=r"summary\.json was not written: the run stopped before it finished"):
        check_run_result(run)
    with hold_lock(run):  # train RUN -o RUN --resume: it rewrites tuned/ and summary.json itself
        check_run_result(run)
