"""Training in several processes under torchrun: who this process is, its share of each batch, sums over all.

    processes = start_processes(config)    # WORLD_SIZE > 1 (torchrun): one process group, gloo on CPU, nccl
                                           # on CUDA (GPU = LOCAL_RANK); otherwise a single process, no group
    indices, weight = processes.share(batch)          # this rank's contiguous part of a global batch
    loss, targets, correct = processes.sum([...])     # sums over every rank (float64)
    processes.seed_dropout(seed, epoch, step)         # per rank and step (only with more than one process)
    stop_processes()                                  # the CLI, at the end

``--batch-size`` is the global batch: every rank draws the same seeded permutation, splits each batch
into contiguous shares and weighs its loss so that the averaged gradient is the one a single process
computes over the whole batch (loop.py). A batch that does not divide by the number of processes is
refused before the group starts; the last, partial batch of an epoch may leave a rank with fewer items
or none (it then runs one item with weight 0, so every rank runs the same collectives).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utune_fx.errors import UtuneError
from utune_fx.train.devices import resolve_device


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives put their tensors (nccl needs the GPU)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, batch: list[int]) -> tuple[list[int], float]:
        """This rank's contiguous part of ``batch`` and its weight: 1, or 0 for a rank the batch leaves
        empty, which runs the batch's first item (so that it joins every collective) and adds nothing."""
        base, extra = divmod(len(batch), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        part = batch[start : start + base + (1 if self.rank < extra else 0)]
        return (part, 1.0) if part else (batch[:1], 0.0)

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over every rank, in float64 (as they are with one process)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (Ctrl-C reaches the ranks at different steps)."""
        return self.sum([float(flag)])[0] > 0 if self.active else flag

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def seed_dropout(self, seed: int, epoch: int, step: int) -> None:
        """With several processes, each rank draws its dropout masks from a generator seeded by (seed, epoch,
        step, rank): ranks draw different masks, and a resumed run draws the same ones again whatever the
        RNG state the checkpoint holds (rank 0's). One process keeps the run's single stream."""
        if self.active:
            torch.manual_seed(hash((seed, epoch, step, self.rank)) & (2**63 - 1))


def _environment_integer(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UtuneError(f"the environment variable {name} is {text!r}, not an integer (torchrun sets it)") from None


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun's environment says, (0, 1, 0) without it."""
    world = _environment_integer("WORLD_SIZE", 1)
    return _environment_integer("RANK", 0), max(world, 1), _environment_integer("LOCAL_RANK", 0)


def rank_device(setting: str, local_rank: int, world_size: int) -> torch.device:
    """--device for this rank: with several processes, cuda (or auto on a CUDA machine) is the GPU of the
    process's LOCAL_RANK; cuda:N, one GPU for every process, is refused."""
    device = resolve_device(setting)
    if world_size == 1 or device.type != "cuda":
        return device
    if setting.startswith("cuda:"):
        raise UtuneError(
            f"--device {setting} names one GPU, but under torchrun each of the {world_size} processes takes the "
            "GPU of its LOCAL_RANK; use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    if local_rank >= torch.cuda.device_count():
        raise UtuneError(
            f"process {local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} visible); "
            "start at most one process per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def check_global_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise UtuneError(
            f"--batch-size {batch_size} is the global batch and must divide by the {world_size} processes; "
            f"use --batch-size {lower or world_size} or {lower + world_size}"
        )


def start_processes(config) -> Processes:
    """Join torchrun's process group when WORLD_SIZE > 1 (once: the CLI calls it, and train() again);
    the global batch and the device are checked before the group starts."""
    rank, world_size, local_rank = launched_world()
    started = dist.is_initialized()
    if started:  # a caller's own group (train() in a script) wins over the environment
        rank, world_size = dist.get_rank(), dist.get_world_size()
    check_global_batch(config.batch_size, world_size)
    device = rank_device(config.device, local_rank, world_size)
    if world_size > 1 and not started:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # MASTER_ADDR/PORT from the env
    return Processes(rank, world_size, local_rank, device)


def current_processes(device: torch.device) -> Processes:
    """This process among those of the running group (one process, rank 0, when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), launched_world()[2], device)
    return Processes(device=device)


def stop_processes() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
