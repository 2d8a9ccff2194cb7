"""``train --cache-features``: the frozen part of a tuned graph runs once per image; training reads the cache.

    before:  every step:  images -> [backbone, frozen] -> f1, f2 -> [tuners, head] -> logits -> loss
    after:   once:        images -> split.frozen -> (f1, f2) per image, in memory
             every step:  (f1, f2)[batch] -> split.trainable -> logits -> loss   (same order, seed, loss, optimizer)

    split = split_graph(gm)       # split.trainable(*split.frozen(*inputs)) == gm(*inputs)
    check_split(split)            # one-line refusals: randomness in the frozen part, nothing to cache, ...
    parallel, train_set, val_set, test_set, config, summary = cache_features(parallel, module, ...)  # loop.py

A node is frozen when no trainable parameter reaches it: neither a get_attr of one, nor a call_module of a
module holding one, nor anything computed from those. The frontier is every frozen node that a trainable node
or the output reads, stored when it is a tensor with one row per image; a frozen value that is not (a shape,
a tuple) is computed again in the trainable part from its own inputs, and so are frozen nodes that read no
input (weights, constants). The trainable part is a GraphModule whose placeholders are the frontier; it shares
the whole graph's modules and parameters under the same names, so the optimizer, checkpoints and tuned/ see
the whole graph as before. Training images are cached in training mode (frozen norms in eval, as training
runs them), validation images in eval mode; the test split is computed batch by batch when it is read (once).
The cache lives in host memory, bounded by UTUNE_FX_FEATURE_CACHE_BYTES (default: half the memory available).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from utune_fx.errors import UtuneError
from utune_fx.match.limits import Limit
from utune_fx.memory import available_memory, human_bytes
from utune_fx.trace.annotate import META_KEY, set_training
from utune_fx.train.parallel import in_place

FLAG = "--cache-features"
MEMORY_SHARE = 0.5  # of the memory available when the cache is built
UNREADABLE_MEMORY_BYTES = 4 * 2**30  # the bound where the memory available cannot be read
_WITHOUT = f"train without {FLAG}"
AUGMENTED = (
    f"{FLAG} needs the same training images every epoch, but the training transform draws a new random crop "
    f"and flip each epoch; add --no-augment, or {_WITHOUT}"
)
_RANDOM = {"bernoulli", "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "normal"}
_RANDOM |= {"poisson", "multinomial", "rrelu", "gumbel_softmax", "native_dropout", "drop_path", "bernoulli_"}
_RANDOM |= {"uniform_", "normal_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_"}  # methods
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


@dataclass
class GraphSplit:
    frozen: fx.GraphModule  # the graph's inputs -> a tuple of the frontier tensors
    trainable: fx.GraphModule  # the frontier tensors -> the graph's output
    frontier: list[fx.Node]  # the whole graph's frozen nodes the trainable part reads, in its placeholder order
    trainable_nodes: set[fx.Node]  # the whole graph's nodes a trainable parameter reaches
    whole: fx.GraphModule
    modules: dict[str, nn.Module]


def _reads_trainable(gm: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op not in ("call_module", "get_attr"):
        return False
    value = modules[node.target] if node.op == "call_module" else attrgetter(node.target)(gm)
    if isinstance(value, nn.Module):
        return any(p.requires_grad for p in value.parameters())
    return isinstance(value, torch.Tensor) and value.requires_grad


def _per_image(node: fx.Node, batch: int | None) -> bool:
    """A tensor with the batch first, as traced (no shapes recorded: taken as one; every batch checks it)."""
    info = node.meta.get(META_KEY)
    return info is None or bool(info.shape) and info.shape[0] == batch


def split_graph(gm: fx.GraphModule) -> GraphSplit:
    """The frozen and the trainable part of ``gm`` (see the module's docstring)."""
    modules = dict(gm.named_modules())
    trainable, reads_input = set(), set()
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            reads_input.add(node)
        elif node.op != "output" and (_reads_trainable(gm, node, modules) or trainable & set(node.all_input_nodes)):
            trainable.add(node)
        elif reads_input & set(node.all_input_nodes):
            reads_input.add(node)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    info = placeholders[0].meta.get(META_KEY) if placeholders else None
    batch = info.shape[0] if info is not None and info.shape else None
    stored, recomputed = set(), set()
    pending = [node for user in (*trainable, output) for node in user.all_input_nodes if node not in trainable]
    while pending:
        node = pending.pop()
        if node in stored or node in recomputed:
            continue
        if node in reads_input and (node.op == "placeholder" or _per_image(node, batch)):
            stored.add(node)
        else:  # a constant, or a frozen value that is not one tensor per image: computed again from its inputs
            recomputed.add(node)
            pending.extend(node.all_input_nodes)
    frontier = [node for node in gm.graph.nodes if node in stored]

    frozen_graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node is not output and node not in trainable:
            env[node] = frozen_graph.node_copy(node, env.__getitem__)
    frozen_graph.output(tuple(env[node] for node in frontier))
    frozen = fx.GraphModule(gm, frozen_graph, class_name="FrozenPart")
    frozen.graph.eliminate_dead_code(lambda node: node.is_impure() or _writes_in_place(node, modules))
    frozen.recompile()
    trainable_graph, env = fx.Graph(), {}
    for node in frontier:
        env[node] = trainable_graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in gm.graph.nodes:
        if node in trainable or node in recomputed:
            env[node] = trainable_graph.node_copy(node, env.__getitem__)
    trainable_graph.output(fx.map_arg(output.args[0], env.__getitem__))
    trainable_part = fx.GraphModule(gm, trainable_graph, class_name="TrainablePart")
    return GraphSplit(frozen, trainable_part, frontier, trainable, gm, modules)


def _writes_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    return in_place(node)


def _where(node: fx.Node) -> str:
    info = node.meta.get(META_KEY)
    return f"{node.name} in {info.scope}" if info is not None and info.scope else node.name


def _drop_rate(module: nn.Module) -> float:
    if isinstance(module, nn.RReLU):
        return 1.0
    rate = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else getattr(module, "drop_prob", 0.0)
    return float(rate) if isinstance(rate, (int, float)) else 0.0


def _random_op(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """What in ``node`` draws random numbers in training mode ('Dropout(p=0.1) blocks.0.attn.proj_drop')."""
    if node.op == "call_module":
        for name, sub in modules[node.target].named_modules():
            if _drop_rate(sub) > 0:
                where = ".".join(filter(None, (node.target, name)))
                return f"{type(sub).__name__}(p={_drop_rate(sub):g}) {where}"
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    name = name.split(".")[0]  # an aten overload: 'dropout.default'
    arguments = dict(zip(("input", "p", "training"), node.args)) | node.kwargs
    rate, training = arguments.get("p", 0.5), arguments.get("training", True)
    if name in _DROPOUTS:
        return f"{name}(p={rate}) ({_where(node)})" if rate and training is not False else None
    if name in _RANDOM or node.kwargs.get("dropout_p", 0):  # scaled_dot_product_attention(dropout_p=...)
        return f"{name} ({_where(node)})"
    return None


def check_split(split: GraphSplit) -> None:
    """Refuse, in one line, a split that caching would get wrong or that saves nothing."""
    nodes, trainable = list(split.whole.graph.nodes), split.trainable_nodes
    if not trainable:
        raise UtuneError(f"{FLAG}: no parameter of the model trains, so there is nothing to train from the cache")
    if all(node.op == "placeholder" for node in split.frontier):
        first = next(node for node in nodes if node in trainable)
        raise UtuneError(
            f"{FLAG}: a trainable parameter acts on the model's input already ({_where(first)}), so no frozen "
            f"feature comes before the tuners and caching would save nothing; {_WITHOUT}"
        )
    for node in nodes:
        found = None if node in trainable else _random_op(node, split.modules)
        if found:
            raise UtuneError(
                f"{FLAG}: the frozen part draws random numbers in training mode: {found}; a cache would keep "
                "one draw for every epoch; set that rate to 0 in the model spec (timm: ?drop_rate=0&"
                f"drop_path_rate=0), or {_WITHOUT}"
            )
    for node in nodes:
        target = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if target is None or target in trainable or not _writes_in_place(node, split.modules):
            continue
        if node in trainable or target in split.frontier:
            raise UtuneError(
                f"{FLAG}: {_where(node)} writes in place into the frozen value {target.name}, so the frozen "
                f"and the trainable part computed one after the other would not see what the whole model "
                f"sees; {_WITHOUT}"
            )


class Features(Dataset):
    """Cached frontier tensors, one row per image, and the labels: items (features, label)."""

    epoch = 0  # set by the loop, as on SeededImages: the items are the same in every epoch

    def __init__(self, tensors: list[torch.Tensor], order: list[int], labels: torch.Tensor):
        self.tensors, self.order, self.labels = tensors, order, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return tuple(self.tensors[i][index] for i in self.order), self.labels[index]


class StreamedFeatures(Dataset):
    """The frozen part's features of ``dataset``, computed in eval mode batch by batch as they are read
    (the test split, which is read once: caching it would save nothing)."""

    def __init__(self, compute, dataset: Dataset):
        self.compute, self.dataset = compute, dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list:
        inputs, labels = default_collate([self.dataset[i] for i in indices])
        features = self.compute(inputs, training=False)
        return [(tuple(t[k] for t in features), labels[k]) for k in range(len(indices))]

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]


def _differs(value: torch.Tensor, other: torch.Tensor) -> bool:
    """Not the same features (floats: beyond what a nondeterministic kernel changes)."""
    if torch.equal(value, other):
        return False
    return not value.is_floating_point() or (value - other).abs().max() > 1e-2 * value.abs().max() + 1e-6


def _distinct(outputs: list[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Frontier tensors that are one tensor (a detach of another, an identity) are stored once:
    (for each output the stored tensor it reads, the outputs stored)."""
    keys = [(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype) for t in outputs]
    kept = [index for index, key in enumerate(keys) if keys.index(key) == index]
    return [kept.index(keys.index(key)) for key in keys], kept


def cache_features(parallel, module: nn.Module, train_set, val_set, test_set, config) -> tuple:
    """What the loop trains with instead: ``parallel`` running the trainable part, the features of the
    training (training mode) and validation images (eval mode) in memory, the test split's streamed, the
    config with no loader workers (nothing left to load), and what summary.json records of the cache."""
    from utune_fx.train.loop import SeededImages, _autocast, freeze_frozen_norm_statistics
    from utune_fx.train.progress import count_progress

    processes = parallel.processes
    if processes.active:
        raise UtuneError(refusal_before_model(augment=False, world_size=processes.world_size))
    if not isinstance(module, fx.GraphModule):
        raise UtuneError(f"{FLAG} splits a torch.fx graph (what cli.py rewrite writes), not a {type(module).__name__}")
    split = split_graph(module)
    check_split(split)
    _check_fixed_images(SeededImages(train_set, config.seed))
    device, names, checked = processes.device, [node.name for node in split.frontier], []

    def compute(inputs, training: bool) -> list[torch.Tensor]:
        set_training(module, training)
        if training:
            freeze_frozen_norm_statistics(module)
        arguments = [argument.to(device) for argument in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
        again = None
        with torch.set_grad_enabled(training), _autocast(device, config):
            outputs = split.frozen(*arguments)
            if training and not checked:  # once: randomness the scan cannot name (inside a function) shows here
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(torch.initial_seed() + 1)
                    again, checked[:] = split.frozen(*arguments), [True]
        for name, value, other in zip(names, outputs, again or outputs):
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or len(value) != len(arguments[0]):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise UtuneError(f"{FLAG}: the frozen feature {name} is not one row per image ({shape}); {_WITHOUT}")
            if value.requires_grad:
                raise UtuneError(
                    f"{FLAG}: the frozen feature {name} needs grad (the model reaches a trainable parameter "
                    f"there in a way the graph does not show); {_WITHOUT}"
                )
            if other is not value and _differs(value, other):
                raise UtuneError(
                    f"{FLAG}: the frozen part draws random numbers in training mode: its feature {name} differs "
                    f"between two runs on the same images; {_WITHOUT}"
                )
        return [value.detach() for value in outputs]

    started, sets = time.perf_counter(), [(train_set, True, "training")]
    if val_set is not None:
        sets.append((val_set, False, "validation"))
    images = sum(len(dataset) for dataset, _, _ in sets)
    if len(train_set):  # two images first: the checks in compute, and the bound on the cache's bytes
        probe = compute(default_collate([train_set[i] for i in range(min(2, len(train_set)))])[0], True)
        kept = _distinct(probe)[1]
        _check_bytes(sum(probe[i][0].numel() * probe[i].element_size() for i in kept), images, len(kept))
    cached = []
    with count_progress("info", enabled=processes.is_main) as bar:
        tasks = [bar.add_task(f"caching frozen features: {what}", total=len(d), info="") for d, _, what in sets]
        for task, (dataset, training, _) in zip(tasks, sets):
            cached.append(_fill(dataset, compute, training, config, bar, task))
    runner = torch.compile(split.trainable) if config.compile else split.trainable
    config = dataclasses.replace(config, workers=0)
    summary = {
        "features_cached": True,
        "feature_cache_bytes": sum(t.numel() * t.element_size() for features in cached for t in features.tensors),
        "feature_cache_images": images,
        "feature_cache_tensors": len(cached[0].tensors),
        "feature_cache_seconds": time.perf_counter() - started,
    }
    val_set = cached[1] if val_set is not None else None
    test_set = StreamedFeatures(compute, test_set) if test_set is not None else None
    return dataclasses.replace(parallel, runner=runner), cached[0], val_set, test_set, config, summary


def _fill(dataset, compute, training: bool, config, bar, task) -> Features:
    """``dataset``'s features, computed in batches, stored in one tensor per distinct frontier tensor."""
    loader = DataLoader(
        dataset, batch_size=config.batch_size * 2, num_workers=config.workers, generator=torch.Generator()
    )  # its own generator: the cache draws nothing from the RNG that training (dropout) uses
    tensors, order, kept, labels, start = None, [], [], [], 0
    for inputs, label in loader:
        outputs = compute(inputs, training)
        if tensors is None:
            order, kept = _distinct(outputs)
            tensors = [torch.empty((len(dataset), *outputs[i].shape[1:]), dtype=outputs[i].dtype) for i in kept]
        for stored, index in zip(tensors, kept):
            stored[start : start + len(outputs[index])].copy_(outputs[index])
        labels.append(torch.as_tensor(label))
        start += len(outputs[0])
        bar.advance(task, len(outputs[0]))
    return Features(tensors or [], order, torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))


def _check_bytes(per_image: int, images: int, tensors: int) -> None:
    """The cache's bytes within UTUNE_FX_FEATURE_CACHE_BYTES (default: a share of the memory available)."""
    available = available_memory()
    default = max(int(available * MEMORY_SHARE), 1) if available else UNREADABLE_MEMORY_BYTES
    limit = Limit("feature_cache_bytes", default, "bytes", f"cache fewer images (--train-size, --shots) or {_WITHOUT}")
    basis = (
        f"{MEMORY_SHARE:.0%} of the {human_bytes(available)} of memory available"
        if available
        else "the memory available is unknown"
    )
    if per_image * images > limit.value():
        raise UtuneError(
            f"{FLAG}: the cache would take {human_bytes(per_image * images)} ({images:,} images x "
            f"{human_bytes(per_image)} of frozen features in {tensors} tensor{'s' * (tensors != 1)}), over the limit "
            f"{limit.name} ({f'{limit.env} is set' if os.environ.get(limit.env, '').strip() else basis}); "
            f"{limit.advice()}"
        )


def _check_fixed_images(seeded) -> None:
    """The training items are the same in every epoch: no random augmentation."""
    for index in range(min(4, len(seeded))):
        seeded.epoch = 0
        first = seeded[index][0]
        seeded.epoch = 1
        second = seeded[index][0]
        pairs = zip(first, second) if isinstance(first, (list, tuple)) else [(first, second)]
        if not all(torch.equal(a, b) for a, b in pairs):
            raise UtuneError(AUGMENTED)
    seeded.epoch = 0


def refusal_before_model(augment: bool, world_size: int) -> str | None:
    """What the command line refuses before any model is built (``augment``: images with the random
    training transform), or None."""
    if world_size > 1:
        return (
            f"{FLAG} builds and reads its cache in one process; run it without torchrun ({world_size} processes "
            f"now), or {_WITHOUT}"
        )
    return AUGMENTED if augment else None
