"""How training and evaluation call a model and read its output: one place, whatever the model returns.

    logits = model_logits(module, inputs, device)   # inputs: a tensor (images) or a list of tensors (token
                                                    # ids, attention mask), moved to device; float32 logits
    logits_of(output)                               # a tensor; a tuple/list -> its first element;
                                                    # a Hugging Face ModelOutput -> .logits, else its first value

A timm or torchvision model returns its logits; a Hugging Face model (and a graph traced from one) returns
a ModelOutput (``SequenceClassifierOutput``, ``CausalLMOutput``, ``ImageClassifierOutput``, ...); a
graph of the torch.export front end may return a tuple. ``logits_of`` reads each the same way, and works
on the structure of a graph's output node too (session.py finds the logits node to check its size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import fx


def logits_of(output):
    """The logits in a model's output: the tensor itself, the first element of a tuple or list, or the
    ``logits`` of a ModelOutput (a mapping: its first value when it has no ``logits``)."""
    if isinstance(output, Mapping):  # transformers' ModelOutput is an OrderedDict of the fields that are set
        if output.get("logits") is not None:
            return output["logits"]
        return logits_of(next(iter(output.values()))) if output else output
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        return logits_of(output[0]) if output else output
    return output


def model_logits(module: torch.nn.Module, inputs, device: torch.device | None = None) -> torch.Tensor:
    """``module`` called on a batch's inputs (one tensor, or several in the order of the model's forward),
    its logits as float32."""
    arguments = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    if device is not None:
        arguments = tuple(argument.to(device) for argument in arguments)
    return logits_of(module(*arguments)).float()


def output_logits_shape(module: fx.GraphModule) -> tuple[int, ...] | None:
    """The traced shape of the logits a graph returns (read as ``logits_of`` reads outputs), or None."""
    output = next(node for node in module.graph.nodes if node.op == "output")
    source = logits_of(output.args[0])
    info = source.meta.get("utune") if isinstance(source, fx.Node) else None
    return tuple(info.shape) if info is not None and info.shape else None
