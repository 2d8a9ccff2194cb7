"""The training loop: only trainable parameters reach the optimizer; repeatable and resumable.

    for epoch:  order = randperm(seed, epoch); for each batch: augment(seed, epoch, index)
                forward (bf16 autocast on CUDA) -> loss / accumulate -> backward
                every `accumulate` batches: clip, step, schedule; Ctrl-C -> checkpoint, stop
                evaluate on val; checkpoint/; metrics.jsonl (rewritten whole from the checkpoint's history)
    end:        test accuracy, finish(summary) (the CLI saves tuned/ there), summary.json, curves.png

Every random draw depends on (seed, epoch, image index) or on RNG state the checkpoint
keeps, so a run interrupted at any step and resumed ends with the same weights as one
that ran through.

Under torchrun (distributed.py, parallel.py) every rank runs this loop on its share of each global
batch; a batch's loss is summed per rank and divided by the whole batch's count, so the averaged
gradient is the single process's. Metrics are summed over the ranks, evaluation is sharded the same
way, and only rank 0 writes (checkpoint, metrics, summary, curves) and shows the progress bar.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from utune_fx.atomic import write_text
from utune_fx.errors import UtuneError
from utune_fx.trace.annotate import set_training
from utune_fx.train.checkpoint import check_progress, load_checkpoint, save_checkpoint
from utune_fx.train.config import TrainConfig
from utune_fx.train.devices import resolve_device
from utune_fx.train.distributed import current_processes, start_processes
from utune_fx.train.optim import create_optimizer, create_schedule
from utune_fx.train.outputs import model_logits
from utune_fx.train.parallel import parallelize
from utune_fx.train.progress import EpochProgress
from utune_fx.train.rundir import CHECKPOINT, METRICS, SUMMARY, compare_settings, config_settings, open_run
from utune_fx.train.tasks import CLASSIFICATION


class SeededImages(Dataset):
    """Items whose augmentation is seeded by (seed, epoch, index): the same on resume and in any worker."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        outer = random.getstate()
        random.seed(hash((self.seed, self.epoch, index)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index, 1)) & (2**63 - 1))
            item = self.dataset[index]
        random.setstate(outer)
        return item


@dataclass
class Interrupt:
    requested: bool = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def pick_device(config: TrainConfig) -> torch.device:
    return resolve_device(config.device)  # one process; a rank's device: distributed.rank_device


def _autocast(device: torch.device, config: TrainConfig):
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def freeze_frozen_norm_statistics(module: nn.Module) -> None:
    """Frozen batch norms keep their running statistics (they are part of the frozen model)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in layer.parameters()):
            layer.eval()


def _batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, size, batch_size)]


@torch.no_grad()
def evaluate(
    module: nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device, task=CLASSIFICATION
) -> dict:
    """Loss and accuracy (per example, or per predicted token; perplexity too for a causal LM: tasks.py).
    Under torchrun each rank measures its share of every batch and the sums are added up: the counts
    are the single process's exactly, the loss up to float rounding."""
    processes = current_processes(device)
    set_training(module, False)  # not eval(): graphs of the torch.export front end refuse it
    size = config.batch_size * 2
    shares = [processes.share(list(range(i, min(i + size, len(dataset))))) for i in range(0, len(dataset), size)]
    loader = DataLoader(
        dataset,
        batch_sampler=[indices for indices, _ in shares],
        num_workers=config.workers,
        generator=torch.Generator(),
    )  # leaves the global RNG to training
    loss = correct = targets = 0
    for (inputs, labels), (_, weight) in zip(loader, shares):
        with _autocast(device, config):
            logits = model_logits(module, inputs, device)
        batch_loss, batch_correct, batch_targets = task.sums(logits, labels.to(device))
        loss, correct, targets = (
            loss + weight * batch_loss,
            correct + weight * batch_correct,
            targets + weight * batch_targets,
        )
    loss, correct, targets = processes.sum([loss, correct, targets])
    return task.metrics(loss, round(correct), round(targets))


def train(
    module: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    out: Path,
    resume: bool = False,
    test_set: Dataset | None = None,
    settings: dict | None = None,
    finish: Callable[[dict], None] | None = None,
    task=CLASSIFICATION,
) -> dict:
    """Train ``module``'s trainable parameters; writes checkpoint/, metrics.jsonl, summary.json, curves.png.
    Without ``val_set`` (a final run on all the training images) no validation is measured. ``settings``
    (model, rules, data selection) join the TrainConfig in what the checkpoint records and --resume holds to;
    ``finish(summary)`` runs after training and before summary.json is written (the session saves tuned/
    there, so summary.json, written last, never describes a result that is not on disk). ``task`` (tasks.py)
    says what the loss and accuracy are: classes, or the next token of a causal language model.
    Under torchrun every rank calls it with the same arguments; rank 0 alone holds the run directory and
    writes it, ``finish`` runs there only, and every rank returns the summary. With ``config.fsdp`` the
    module's frozen weights stay sharded afterwards (parallel.py)."""
    processes = start_processes(config)
    arguments = (module, train_set, val_set, config, out, resume, test_set, settings, finish, task, processes)
    if not processes.is_main:
        processes.barrier()  # rank 0 has locked the run and repaired what a kill left before anyone reads it
        return _train_locked(*arguments)
    with open_run(out, resume, None):  # one writer per run directory (nests inside the CLI's hold)
        processes.barrier()
        return _train_locked(*arguments)


def _train_locked(module, train_set, val_set, config, out, resume, test_set, settings, finish, task, processes):
    from utune_fx.train.plots import plot_curves

    device, writes = processes.device, processes.is_main
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    parallel = parallelize(module, processes, device, config.fsdp and processes.active, config.compile)
    optimizer = create_optimizer(module, config)
    per_epoch = math.ceil(math.ceil(len(train_set) / config.batch_size) / config.accumulate)
    schedule = create_schedule(optimizer, round(config.warmup_epochs * per_epoch), config.epochs * per_epoch)
    progress = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0}
    settings = config_settings(config) | (settings or {})
    data = {"train_images": len(train_set), "steps_per_epoch": per_epoch}
    if resume:  # every rank reads the checkpoint: tuner weights and optimizer state are whole on each
        state = load_checkpoint(out / CHECKPOINT, module, optimizer, schedule)
        recorded = state["settings"]
        compare_settings(out, {k: recorded.get(k) for k in settings}, settings, state["progress"]["epoch"])
        check_progress(out / CHECKPOINT, state, len(train_set), per_epoch)
        progress, settings = state["progress"], recorded | settings
        if writes:
            _write_metrics(out, progress["history"])  # a kill after the checkpoint and before the metrics
    cache = {"features_cached": False}
    if config.cache_features:  # the frozen part once per image; training and validation read it (feature_cache.py)
        from utune_fx.train.feature_cache import cache_features

        parallel, train_set, val_set, test_set, config, cache = cache_features(
            parallel, module, train_set, val_set, test_set, config
        )
    seeded = train_set if config.cache_features else SeededImages(train_set, config.seed)  # a cache draws nothing
    interrupt = Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt)
    started = time.perf_counter() - progress["seconds"]

    def checkpoint() -> None:
        if writes:
            save_checkpoint(out / CHECKPOINT, module, optimizer, schedule, progress, settings, data)
        processes.barrier()  # no rank ends (and has torchrun stop the others) while rank 0 writes

    try:
        while progress["epoch"] < config.epochs:
            stopped = _train_epoch(parallel, module, seeded, optimizer, schedule, config, progress, interrupt, task)
            progress["seconds"] = time.perf_counter() - started
            if stopped:
                checkpoint()
                raise KeyboardInterrupt
            row = progress.pop("running")
            if val_set is not None:
                row |= {f"val_{k}": v for k, v in evaluate(parallel.runner, val_set, config, device, task).items()}
            progress["history"].append(row)
            progress["epoch"], progress["step"] = progress["epoch"] + 1, 0
            checkpoint()
            if writes:
                _write_metrics(out, progress["history"])
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = _summary(module, progress, device) | {"world_size": processes.world_size} | cache
    if test_set is not None:
        summary["test_accuracy"] = evaluate(parallel.runner, test_set, config, device, task)["accuracy"]
    if writes:
        if finish is not None:
            finish(summary)
        write_text(out / SUMMARY, json.dumps(summary, indent=1))
        plot_curves(progress["history"], out / "curves.png")
    processes.barrier()  # the run directory is complete before any rank returns
    return summary


def _write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl from the checkpoint's history, whole (so it never lags the checkpoint or tears)."""
    write_text(out / METRICS, "".join(json.dumps(row) + "\n" for row in history))


def _train_epoch(parallel, module, seeded, optimizer, schedule, config, progress, interrupt, task) -> bool:
    """One epoch from ``progress['step']``; returns True when Ctrl-C asked to stop (at a step boundary)."""
    processes = parallel.processes
    set_training(module, True)
    freeze_frozen_norm_statistics(module)
    seeded.epoch = progress["epoch"]
    batches = _batches(len(seeded), config.batch_size, config.seed, progress["epoch"])
    groups = [batches[i : i + config.accumulate] for i in range(0, len(batches), config.accumulate)]
    running = progress.setdefault(
        "running",
        {"epoch": progress["epoch"] + 1, "train_loss": 0.0, "train_accuracy": 0.0, "images": 0, "seconds": 0.0},
    )
    running.setdefault("targets", running["images"])  # what accuracy counts: examples, or predicted tokens
    bar = EpochProgress(progress["epoch"] + 1, config.epochs, sum(map(len, batches)), enabled=processes.is_main)
    bar.advance(sum(len(b) for group in groups[: progress["step"]] for b in group))
    remaining = groups[progress["step"] :]
    shares = [[processes.share(batch) for batch in group] for group in remaining]  # all of a batch: one process
    # one loader per epoch (workers start once); items are seeded per image, so prefetching changes nothing;
    # its own generator keeps it from drawing on the global RNG, which dropout uses and the checkpoint keeps
    loader = iter(
        DataLoader(
            seeded,
            batch_sampler=[indices for group in shares for indices, _ in group],
            num_workers=config.workers,
            generator=torch.Generator().manual_seed(config.seed),
        )
    )
    trainable = [p for p in module.parameters() if p.requires_grad]
    with bar:
        for group, group_shares in zip(remaining, shares):
            tic = time.perf_counter()
            total = sum(len(b) for b in group)
            processes.seed_dropout(config.seed, progress["epoch"], progress["step"])
            for index, (batch, (_, weight)) in enumerate(zip(group, group_shares)):
                inputs, labels = next(loader)
                with parallel.micro_batch(last=index == len(group) - 1):
                    loss, correct, targets = _backward(
                        parallel, inputs, labels, len(batch) / total, weight, config, task
                    )
                running["train_loss"] += loss * len(batch)
                running["train_accuracy"] += correct
                running["targets"] += targets
                running["images"] += len(batch)
                if not math.isfinite(loss):
                    raise UtuneError(
                        f"the training loss is {loss} at epoch {progress['epoch'] + 1}, step "
                        f"{progress['step'] + 1}: training diverged; lower --lr (now {config.lr:g})"
                    )
            parallel.sync_gradients()
            if config.clip_grad:
                nn.utils.clip_grad_norm_(trainable, config.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            progress["step"] += 1
            running["seconds"] += time.perf_counter() - tic
            bar.update(total, running)
            if processes.any(interrupt.requested):  # every rank stops at the same step
                return True
    images = max(running["images"], 1)
    running.update(
        train_loss=running["train_loss"] / images,
        train_accuracy=running["train_accuracy"] / max(running["targets"], 1),
        lr=schedule.get_last_lr()[0],
        images_per_second=running["images"] / max(running["seconds"], 1e-9),
    )
    return False


def _backward(parallel, inputs, labels, share_of_step: float, weight: float, config, task) -> tuple[float, int, int]:
    """Forward and backward of this rank's share of a batch; returns the whole batch's mean loss, correct
    predictions and targets (summed over the ranks).

    The gradient is the one a single process takes of (the batch's mean loss) x (the batch's share of the
    step's items): this rank's summed loss over the count of the whole batch (examples, or predicted tokens,
    which differ between shares), times the number of ranks, which averaging over the ranks (DDP, or
    sync_gradients) divides out again. A rank the batch left empty runs with weight 0 and adds nothing."""
    processes = parallel.processes
    device = processes.device
    labels = labels.to(device)
    with _autocast(device, config):
        logits = model_logits(parallel.runner, inputs, device)
    loss_sum, count = task.loss_sum(logits, labels, config.label_smoothing)
    correct, _ = task.correct(logits, labels)
    batch_loss, targets, batch_correct = processes.sum([weight * loss_sum.item(), weight * count, weight * correct])
    (loss_sum * (weight * processes.world_size * share_of_step / max(targets, 1))).backward()
    return batch_loss / max(targets, 1), round(batch_correct), round(targets)


def _summary(module: nn.Module, progress: dict, device: torch.device) -> dict:
    history = progress["history"]
    best = max(history, key=lambda row: row["val_accuracy"]) if history and "val_accuracy" in history[0] else {}
    last = history[-1] if history else {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    summary = {
        "epochs": len(history),
        "best_val_accuracy": best.get("val_accuracy"),
        "best_epoch": best.get("epoch"),
        "last_val_accuracy": last.get("val_accuracy"),
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "wall_seconds": progress["seconds"],
        "seconds_per_epoch": progress["seconds"] / max(len(history), 1),
        "peak_memory_bytes": peak,
        "device": str(device),
    }
    if "val_perplexity" in last:  # a causal language model: accuracy is token accuracy
        summary["last_val_perplexity"] = last["val_perplexity"]
    return summary
