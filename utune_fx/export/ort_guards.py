"""Rewrite ONNX patterns that ONNX Runtime's graph optimizer gets wrong, into exact equivalents.

    before:  p = Pad(x, pads, 0)          y = MaxPool(p, kernel k, strides s)
    after:   m = MaxPool(x, k, s, pads)   y = Max(m, border)     border: 0 where a window covers
                                                                 padding, -inf elsewhere (a constant)

ONNX Runtime's PadFusion (an L1 optimisation, on by default) folds a constant Pad of value 0 into
the MaxPool that reads it, as MaxPool padding; but MaxPool pads with -inf, so a window whose real
values are all negative yields their maximum instead of the padded 0 (reported against ONNX's own
optimizer: onnx/optimizer#318, onnxsim#290). Hugging Face BiT pads its stem's output with 0 before a
3 x 3 max pool, and differed from PyTorch by 4e-2 in ONNX Runtime. The rewrite computes the padded
zeros explicitly, so every optimizer level gives PyTorch's values; a pattern it cannot prove
(spatial sizes unknown, dilation, ceil mode, a pad as wide as the kernel) is left as it is.

guard_zero_pad_max_pool(model) -> how many it rewrote
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is computed from constants alone (the TorchScript exporter builds
    a Pad's pads with Concat, Reshape, Slice...), evaluated with onnx's reference runtime."""
    initializers = {i.name: i for i in model.graph.initializer}
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    producers = {output: node for node in model.graph.node for output in node.output}
    needed, frontier = [], [name]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None:
            continue
        if node not in needed:
            needed.append(node)
            frontier.extend(i for i in node.input if i and i not in initializers)
    reads = {i for node in needed for i in node.input if i}
    if not needed or any(i not in initializers and i not in producers for i in reads):
        return None  # it reads a graph input
    order = [node for node in model.graph.node if node in needed]
    graph = helper.make_graph(
        order,
        "constant",
        [],
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
        [initializers[i] for i in reads if i in initializers],
    )
    try:
        from onnx.reference import ReferenceEvaluator

        return np.asarray(
            ReferenceEvaluator(helper.make_model(graph, opset_imports=model.opset_import)).run(None, {})[0]
        )
    except Exception:  # an op the reference runtime lacks: leave the pattern alone
        return None


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[list, int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            found[value.name] = (dims, tensor.elem_type)
    return found


def _touches_padding(size: int, before: int, after: int, kernel: int, stride: int) -> np.ndarray | None:
    """Per output position along one axis: does its window cover a padded element?"""
    if before >= kernel or after >= kernel:
        return None
    outputs = (size + before + after - kernel) // stride + 1
    starts = np.arange(outputs) * stride
    return (starts < before) | (starts + kernel > before + size)


def guard_zero_pad_max_pool(model: onnx.ModelProto) -> int:
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    shapes = None
    rewritten = 0
    for pad in list(graph.node):
        pool = readers.get(pad.output[0], [None])[0] if pad.op_type == "Pad" else None
        if pool is None or pool.op_type != "MaxPool" or len(readers[pad.output[0]]) != 1 or len(pool.output) != 1:
            continue
        if _attribute(pad, "mode", b"constant") not in (b"constant", "constant") or len(pad.input) < 2:
            continue
        value = _constant(model, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        pads = _constant(model, pad.input[1])
        kernel = list(_attribute(pool, "kernel_shape", []))
        rank = len(kernel) + 2
        if value is None or value.size != 1 or float(value) != 0.0 or pads is None or pads.size != 2 * rank:
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # an axes input: not the plain form
        before, after = pads[:rank].tolist(), pads[rank:].tolist()
        if any(before[:2]) or any(after[:2]) or min(before + after) < 0:
            continue
        strides = list(_attribute(pool, "strides", [1] * len(kernel)))
        if any(d != 1 for d in _attribute(pool, "dilations", [1] * len(kernel))) or _attribute(pool, "ceil_mode", 0):
            continue
        if any(_attribute(pool, "pads", [0] * 2 * len(kernel))) or _attribute(pool, "auto_pad", b"NOTSET") not in (
            b"NOTSET",
            "NOTSET",
        ):
            continue
        shapes = shapes if shapes is not None else _shapes(model)
        dims, element = shapes.get(pad.input[0], (None, None))
        if not dims or len(dims) != rank or any(d is None for d in dims[2:]):
            continue
        touches = [
            _touches_padding(size, b, a, k, s)
            for size, b, a, k, s in zip(dims[2:], before[2:], after[2:], kernel, strides)
        ]
        if any(t is None for t in touches):
            continue
        covered = np.zeros([len(t) for t in touches], dtype=bool)
        for axis, touch in enumerate(touches):
            covered |= touch.reshape([-1 if i == axis else 1 for i in range(len(touches))])
        dtype = helper.tensor_dtype_to_np_dtype(element)
        border = np.where(covered, 0, -np.inf).astype(dtype).reshape([1, 1, *covered.shape])
        border_name = f"{pool.output[0]}_zero_padding"
        graph.initializer.append(numpy_helper.from_array(border, border_name))
        pooled = f"{pool.output[0]}_unpadded"
        new_pool = helper.make_node(
            "MaxPool",
            [pad.input[0]],
            [pooled],
            name=f"{pool.name}_unpadded",
            kernel_shape=kernel,
            strides=strides,
            pads=before[2:] + after[2:],
        )
        maximum = helper.make_node("Max", [pooled, border_name], [pool.output[0]], name=f"{pool.name}_zero_padding")
        at = list(graph.node).index(pool)
        graph.node.remove(pool)
        graph.node.insert(at, maximum)
        graph.node.insert(at, new_pool)
        graph.node.remove(pad)
        _drop_unread(model, [name for name in pad.input[1:] if name])
        rewritten += 1
    return rewritten


def _drop_unread(model: onnx.ModelProto, names: list[str]) -> None:
    """The removed Pad's constants, and what computed them, where nothing else reads them."""
    outputs = {o.name for o in model.graph.output}
    frontier = list(names)
    while frontier:
        name = frontier.pop()
        if any(name in node.input for node in model.graph.node) or name in outputs:
            continue
        for initializer in list(model.graph.initializer):
            if initializer.name == name:
                model.graph.initializer.remove(initializer)
        for node in list(model.graph.node):
            if name in node.output and all(
                not any(o in n.input for n in model.graph.node) for o in node.output if o != name
            ):
                model.graph.node.remove(node)
                frontier.extend(i for i in node.input if i)
