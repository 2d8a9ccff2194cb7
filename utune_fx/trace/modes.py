"""Eval mode for a while, without calling ``eval()``.

    with eval_mode(model, graph):   # every submodule of both: training = False
        ...                         # then each back to its own mode

torch.export's graphs refuse ``train()``/``eval()``; a graph and the model it was traced from share
submodules, so the modes are recorded per submodule and given back one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout off; batch norms on their running statistics, which a
    training batch norm would update), then each back as it was; not module.eval(), which the graphs
    of torch.export refuse. Several modules may share submodules (a graph and its model)."""
    modes = {sub: sub.training for module in modules for sub in module.modules()}
    try:
        for sub in modes:
            sub.training = False
        yield
    finally:
        for sub, training in modes.items():
            sub.training = training
