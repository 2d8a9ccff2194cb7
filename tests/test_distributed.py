"""cli.py train under torchrun (2 processes, gloo on CPU): the tuners equal a single process's with the same
global batch, with DDP and with FSDP2; only rank 0 writes; a checkpoint of 2 processes resumes in 1; a
global batch the processes cannot split is one error line (exit 2); the loss weighting of a batch split
between ranks gives the single process's gradient for token-level losses too."""

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from utune_fx.cli import main
from utune_fx.rewrite.artifact import load_tuned
from utune_fx.train import TrainConfig
from utune_fx.train.distributed import Processes
from utune_fx.train.loop import _backward
from utune_fx.train.parallel import Parallel
from utune_fx.train.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
SPEC = "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=2&num_classes=10&global_pool=avg"
# 301 images: the last batch of each epoch (13) splits 7 + 6; accumulation and label smoothing (0.1) on
RUN = [
    "--rules", str(ROOT / "rules" / "dual_utuner.yaml"), "--data", "digits", "--train-size", "301", "--val-size", "100",
    "--batch-size", "32", "--accumulate", "2", "--lr", "1e-2", "--no-augment", "--json",
]  # fmt: skip
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*argv: str, processes: int = 2) -> subprocess.CompletedProcess:
    """cli.py train ... under torchrun, with this venv's torch and a free rendezvous port."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(ROOT / "cli.py"), "train", *argv,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _assert_close(first: dict, second: dict, prefix: str = "") -> None:
    names = [name for name in first if name.startswith(prefix)]
    assert names and sorted(names) == sorted(n for n in second if n.startswith(prefix))
    worst = max((first[n] - second[n]).abs().max().item() for n in names)
    assert worst <= TOLERANCE, worst


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One epoch in one process (in this one) and in two under torchrun, same global batch and seed; run once
    for all pytest-xdist workers (xdist's recipe: a folder they share, a lock, a marker once done)."""
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent / "distributed" if shared else tmp_path_factory.mktemp("runs")
    root.mkdir(exist_ok=True)
    single, double, done = root / "single", root / "double", root / "done"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here for the first one's runs
        if not done.exists():
            assert main(["train", SPEC, *RUN, "--epochs", "1", "-o", str(single)]) == 0
            launched = _torchrun(SPEC, *RUN, "--epochs", "1", "-o", str(double))
            assert launched.returncode == 0, launched.stderr[-3000:]
            done.write_text(json.dumps({"stdout": launched.stdout, "stderr": launched.stderr}))
    return single, double, json.loads(done.read_text())


def test_two_processes_train_the_tuners_one_process_trains(runs):
    single, double, _ = runs
    _assert_close(_tensors(single / "tuned" / "tuners.safetensors"), _tensors(double / "tuned" / "tuners.safetensors"))
    one, two = _metrics(single), _metrics(double)
    assert [(r["images"], r["targets"]) for r in two] == [(301, 301)]  # every image once, counted over ranks
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], abs=TOLERANCE)
    assert two[0]["val_loss"] == pytest.approx(one[0]["val_loss"], abs=TOLERANCE)  # sharded evaluation
    summaries = [json.loads((run / "summary.json").read_text()) for run in (single, double)]
    assert [s["world_size"] for s in summaries] == [1, 2]
    assert summaries[1]["test_accuracy"] == pytest.approx(summaries[0]["test_accuracy"], abs=1 / 359)


def test_only_rank_zero_writes_and_prints(runs):
    single, double, launched = runs
    assert sorted(p.name for p in double.iterdir()) == sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in (double / "checkpoint").iterdir()) == ["state.json", "tensors.safetensors"]
    assert len((double / "metrics.jsonl").read_text().splitlines()) == 1  # one line per epoch, not per rank
    assert json.loads(launched["stdout"])["world_size"] == 2  # one summary on stdout: rank 0's
    assert launched["stderr"].count("epoch 1/1") == 1  # one progress bar
    assert launched["stderr"].count("301 training, 100 validation") == 1


def test_a_checkpoint_holds_nothing_of_the_processes_that_wrote_it(runs):
    single, double, _ = runs
    first, second = (_tensors(run / "checkpoint" / "tensors.safetensors") for run in (single, double))
    assert sorted(first) == sorted(second)
    _assert_close(first, second, "model.")
    _assert_close(first, second, "optim.")
    states = [json.loads((run / "checkpoint" / "state.json").read_text()) for run in (single, double)]
    assert states[0]["settings"] == states[1]["settings"] and states[0]["data"] == states[1]["data"]


def test_a_run_of_two_processes_resumes_in_one(runs, tmp_path):
    """--epochs 1, then --resume --epochs 2: equal whether the first epoch ran in 2 processes or 1. (Not equal
    to a run started with --epochs 2: its cosine decay ends at epoch 2, the resumed run's was stretched.)"""
    single, double, _ = runs
    resumed = {}
    for name, run in (("single", single), ("double", double)):
        shutil.copytree(run, tmp_path / name)
        assert main(["train", SPEC, *RUN, "--epochs", "2", "--resume", "-o", str(tmp_path / name)]) == 0
        resumed[name] = tmp_path / name
    _assert_close(*(_tensors(run / "tuned" / "tuners.safetensors") for run in resumed.values()))
    first, second = (_metrics(run) for run in resumed.values())
    assert [r["epoch"] for r in second] == [1, 2]
    assert second[1]["val_loss"] == pytest.approx(first[1]["val_loss"], abs=TOLERANCE)
    assert json.loads((resumed["double"] / "summary.json").read_text())["world_size"] == 1


def test_fsdp_shards_the_frozen_weights_and_trains_the_same_tuners(runs, tmp_path):
    single, _, _ = runs
    launched = _torchrun(SPEC, *RUN, "--epochs", "1", "--fsdp", "-o", str(tmp_path / "fsdp"))
    if launched.returncode != 0 and "not supported" in launched.stderr:  # FSDP2 on gloo: torch 2.13 has it
        pytest.skip(f"FSDP2 does not run on CPU with gloo in torch {torch.__version__}")
    assert launched.returncode == 0, launched.stderr[-3000:]
    trained = _tensors(tmp_path / "fsdp" / "tuned" / "tuners.safetensors")
    _assert_close(_tensors(single / "tuned" / "tuners.safetensors"), trained)
    tuned = load_tuned(tmp_path / "fsdp" / "tuned")  # the manifest's base hash is the whole frozen model's
    assert all(torch.equal(dict(tuned.module.named_parameters())[name], t) for name, t in trained.items())


def test_a_global_batch_the_processes_cannot_split_is_one_error(tmp_path, monkeypatch, capsys):
    argv = ["train", SPEC, *RUN, "--batch-size", "31", "-o", str(tmp_path / "a")]
    launched = _torchrun(*argv[1:])
    errors = [line for line in launched.stderr.splitlines() if line.startswith("error: ")]
    assert launched.returncode != 0 and len(errors) == 1, launched.stderr[-2000:]  # rank 0's line only
    assert errors[0] == (
        "error: --batch-size 31 is the global batch and must divide by the 2 processes; use --batch-size 30 or 32"
    )
    assert "exitcode  : 2" in launched.stderr  # torchrun's report of each process
    assert not (tmp_path / "a").exists()  # refused before the run directory
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: the check comes before any process group
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == errors[0]


def test_a_batch_split_between_ranks_has_the_single_process_gradient():
    """The loss weighting, without processes: two ranks' shares of a causal-LM batch with padding (their
    token counts differ) and label smoothing; the ranks' gradients averaged are the whole batch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    ids = torch.randint(0, 11, (5, 6))
    labels = ids.clone()
    labels[0, 2:], labels[3, 4:] = -100, -100  # padding: rank 0's share has fewer tokens to predict
    config, task = TrainConfig(label_smoothing=0.1, device="cpu"), TASKS["causal-lm"]

    def gradient(processes, rows, share_of_step=0.75):
        model.zero_grad()
        parallel = Parallel(model, processes)
        loss, correct, targets = _backward(parallel, ids[rows], labels[rows], share_of_step, 1.0, config, task)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), loss, targets

    whole, whole_loss, whole_targets = gradient(Processes(), slice(0, 5))
    shares = [slice(0, 3), slice(3, 5)]  # Processes.share of 5 rows over 2 ranks: 3 + 2
    assert [Processes(r, 2).share(list(range(5))) for r in (0, 1)] == [([0, 1, 2], 1.0), ([3, 4], 1.0)]
    local = [task.loss_sum(model(ids[rows]), labels[rows], 0.1) for rows in shares]
    local = [[s.item(), n, task.correct(model(ids[rows]), labels[rows])[0]] for (s, n), rows in zip(local, shares)]
    assert local[0][1] != local[1][1]  # uneven token counts: a per-rank mean would weigh them wrongly

    class TwoRanks(Processes):  # sum() as an all-reduce over the two ranks returns it
        def sum(self, values):
            return [a + b for a, b in zip(local[0], local[1])]

    per_rank = [gradient(TwoRanks(rank, 2), rows) for rank, rows in enumerate(shares)]
    averaged = (per_rank[0][0] + per_rank[1][0]) / 2  # what DDP's all-reduce makes of them
    assert torch.allclose(averaged, whole, atol=1e-7), (averaged - whole).abs().max()
    assert per_rank[0][1] == pytest.approx(whole_loss) and per_rank[0][2] == whole_targets
    assert Processes(1, 4).share([7, 8]) == ([8], 1.0) and Processes(3, 4).share([7, 8]) == ([7], 0.0)
