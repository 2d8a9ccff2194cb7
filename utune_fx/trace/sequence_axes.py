"""Token inputs and their sequence axis: which sizes besides the batch a graph leaves free.

    token_inputs((input_ids[2, 8], attention_mask[2, 8]))          -> [True, True]
    token_inputs((input_values[2, 400] float, attention_mask[2, 400])) -> [False, False]  (audio samples)
    token_inputs((input_features[2, 80, 3000], attention_mask[2, 80]))  -> [False, False]  (mel bins)
    token_inputs((pixel_values[2, 3, 64, 64],))                    -> [False]

The rule: axis 1 of every integer or bool input of rank 2 (token ids, and the masks, token types and
positions beside them) is a sequence axis, unless a floating-point input has the same size on its axis 1
(the mask then counts what that input holds, audio samples or mel bins, not tokens). The torch.export front end traces
those axes as dynamic (one symbol per distinct length torch.export infers: an encoder's and a decoder's
tokens stay apart), the ONNX export marks them dynamic and verifies at two lengths
(:func:`longer_by` makes the second). When torch.export specialises a sequence axis (the model
compares the token count with a constant, or adds a parameter of fixed length), the trace keeps it
fixed and ``SequenceAxis.reason`` says why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SEQUENCE_DIM = 1


def token_inputs(inputs: Sequence[object]) -> list[bool]:
    """Which inputs carry tokens on axis 1 (see the module docstring)."""
    tensors = [x if isinstance(x, torch.Tensor) else None for x in inputs]
    float_lengths = {x.shape[SEQUENCE_DIM] for x in tensors if x is not None and x.dim() >= 2 and x.is_floating_point()}
    return [
        x is not None
        and x.dim() == 2
        and not x.is_floating_point()
        and not x.is_complex()
        and x.shape[SEQUENCE_DIM] not in float_lengths
        for x in tensors
    ]


def longer_by(inputs: Sequence[torch.Tensor], extra: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The inputs with ``extra`` more tokens on every token input, drawn from each input's own range
    (masks stay 0/1, ids stay inside the ids the model was shown); inputs of equal length stay equal."""
    longer = []
    for example, is_token in zip(inputs, token_inputs(inputs)):
        if not is_token or extra == 0:
            longer.append(example)
            continue
        shape = (example.shape[0], example.shape[SEQUENCE_DIM] + extra)
        low, high = (int(example.min()), int(example.max())) if example.numel() else (0, 0)
        longer.append(torch.randint(low, high + 1, shape, generator=generator).to(example.dtype))
    return longer


@dataclass
class SequenceAxis:
    """The sequence axis of a graph's token inputs, for the trace report."""

    inputs: list[str]  # the token inputs, by name
    lengths: list[int]  # their lengths in the example inputs
    dynamic: bool  # False: fixed at the example lengths
    reason: str | None = None  # why it is fixed

    def describe(self) -> str:
        names = ", ".join(self.inputs)
        lengths = "/".join(str(n) for n in dict.fromkeys(self.lengths))
        if self.dynamic:
            return f"sequence length dynamic (axis 1 of {names}; traced at {lengths})"
        return f"sequence length fixed at {lengths} ({names}) because {self.reason}"

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "lengths": self.lengths, "dynamic": self.dynamic, "reason": self.reason}


# torch.export: "You marked L['args'][0].size()[1] as dynamic but your code specialized it to be a constant (8)"
_SPECIALISED = re.compile(r"L\[([^\]]+)\](?:\[(\d+)\])?\.size\(\)\[(\d+)\].*?specialized it to be a constant \((\d+)\)")


def specialisation_reason(error: BaseException, names: Sequence[str]) -> str:
    """Why torch.export refused a dynamic sequence axis, in words; ``names`` are the inputs' names."""
    text = str(error)
    found = _SPECIALISED.search(text)
    if found:
        which, index, axis, value = found.groups()
        name = names[int(index)] if index is not None and int(index) < len(names) else which.strip("'\"")
        return (
            f"torch.export specialises {name} axis {axis} to {value}: the model compares the token count "
            "with a constant or combines the tokens with a tensor of fixed length"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return f"torch.export refuses a dynamic sequence axis ({first[:200]})"
