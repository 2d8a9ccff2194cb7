"""How the training processes share one model: DistributedDataParallel, or FSDP2 over the frozen weights.

    parallel = parallelize(module, processes, device, fsdp, compile)
    parallel.runner                          # what training calls (DDP, the sharded module, torch.compile of it)
    with parallel.micro_batch(last=False):   # DDP: gradients meet on the last micro-batch of a step only
        forward, backward
    parallel.sync_gradients(trainable)       # FSDP: the tuners' gradients averaged over the ranks

One process: the module itself. DDP: the whole model on every rank, trainable gradients averaged in
backward. FSDP (``--fsdp``, torch.distributed.fsdp.fully_shard): every frozen weight is sharded over
the ranks and gathered just before the module that reads it runs (and again for backward); the
trainable parameters are left out of the sharding (``ignored_params``): tuners are small, so every rank
keeps them whole, their optimizer state too, and checkpoints hold full tensors in the usual format with
nothing to gather. Their gradients are averaged here, as DDP would.

In a torch.fx graph only the leaf modules a ``call_module`` node runs have forward hooks that fire, so
those are the units sharded one by one (called once, owning frozen weights that no ``get_attr`` node and
no other module reads); every other frozen weight (read by ``get_attr``, shared, or of a module called
twice) joins the root's unit, which is gathered for the whole forward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from utune_fx.train.distributed import Processes


@dataclass
class Parallel:
    runner: nn.Module
    processes: Processes
    data_parallel: bool = False  # gradients meet inside backward (DDP)
    replicated: list[nn.Parameter] = field(default_factory=list)  # averaged by sync_gradients (FSDP's tuners)

    def micro_batch(self, last: bool):
        if self.data_parallel and not last:
            return self._ddp().no_sync()
        return contextlib.nullcontext()

    def _ddp(self) -> nn.parallel.DistributedDataParallel:
        runner = self.runner
        return getattr(runner, "_orig_mod", runner)  # under torch.compile

    def sync_gradients(self) -> None:
        """Average the replicated parameters' gradients over the ranks, in one flat all-reduce."""
        gradients = [p.grad for p in self.replicated if p.grad is not None]  # unused ones have none on every rank
        if not gradients or not self.processes.active:
            return
        flat = torch.cat([g.reshape(-1) for g in gradients])
        dist.all_reduce(flat)
        flat /= self.processes.world_size
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()


def parallelize(module: nn.Module, processes: Processes, device: torch.device, fsdp: bool, compile: bool) -> Parallel:
    """Place ``module`` on ``device`` and wrap it for ``processes`` (see the module's docstring)."""
    if processes.active and fsdp:
        trainable = shard_frozen(module, processes, device)
        runner = torch.compile(module) if compile else module
        return Parallel(runner, processes, replicated=trainable)
    module.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
    if not processes.active:
        return Parallel(torch.compile(module) if compile else module, processes)
    # every rank built the same frozen model; DDP still broadcasts rank 0's parameters and buffers once,
    # so they are equal bit for bit. Frozen norms' buffers never change, so they need no broadcast per step
    wrapped = nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
    )
    return Parallel(torch.compile(wrapped) if compile else wrapped, processes, data_parallel=True)


def shard_frozen(module: nn.Module, processes: Processes, device: torch.device) -> list[nn.Parameter]:
    """fully_shard ``module``'s frozen weights over the ranks (the trainable ones ignored and moved to
    ``device`` whole); returns the trainable parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trainable = [p for p in module.parameters() if p.requires_grad]
    mesh = init_device_mesh(device.type, (processes.world_size,))
    # FSDP warns for every unit whose output is a view (a Linear on [B, N, C] returns one) that an in-place op
    # on it would skip the backward gathering; shard_units leaves the units whose outputs are written in place whole
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    ignored = set(trainable)
    for name in shard_units(module):
        fully_shard(module.get_submodule(name), mesh=mesh, ignored_params=ignored)
    fully_shard(module, mesh=mesh, ignored_params=ignored)  # the rest, and the root that drives the others
    with torch.no_grad():
        for parameter in trainable:  # fully_shard moves what it manages; the tuners stay whole
            parameter.data = parameter.data.to(device)
        for owner in module.modules():
            for key, buffer in owner._buffers.items():
                if buffer is not None and buffer.device != device:
                    owner._buffers[key] = buffer.to(device)
    return trainable


def in_place(node) -> bool:
    """A graph node that writes into its first argument (x += y, x.add_(y), ...)."""
    import operator

    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and (
        node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv) or name.endswith("_")
    )


def shard_units(module: nn.Module) -> list[str]:
    """The submodules of a torch.fx graph that can be sharded each on its own: run by exactly one
    ``call_module`` node, owning at least one frozen weight, none of which is read elsewhere (by a
    ``get_attr`` node or through another module). Not a graph: none (the root unit holds everything)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    attributes = [node.target for node in graph.nodes if node.op == "get_attr"]
    # FSDP's backward gathering hangs on the module's output; an in-place op on it would bypass that
    written = {node.target for node in graph.nodes if node.op == "call_module" and any(map(in_place, node.users))}
    owners = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    chosen: list[str] = []
    for name in sorted(calls):
        parameters = list(module.get_submodule(name).parameters())
        if calls[name] != 1 or name in written or all(p.requires_grad for p in parameters):
            continue
        if any(owners[id(p)] > 1 for p in parameters):  # tied to another module's weight
            continue
        if any(target == name or target.startswith(name + ".") for target in attributes):
            continue
        if any(name.startswith(done + ".") or done.startswith(name + ".") for done in chosen):
            continue
        chosen.append(name)
    return chosen
