"""Tied parameters: one tensor under several names (GPT-2's lm_head.weight is transformer.wte.weight).

    model.named_parameters(remove_duplicate=False)
        lm_head.weight, transformer.wte.weight  ->  tied_groups: [["transformer.wte.weight", "lm_head.weight"]]

Training one name trains them all, and a file that holds every name holds the
tensor several times (BART's shared embedding: 4). The rewrite report says
which rule trains a tied tensor through which name; ``one_copy`` keeps one
name per tensor for writing, ``with_aliases`` restores the others on reading.
A graph module may keep one name where the model had several (torch.fx names
a tensor once): every function here reads whatever names the module has.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def tied_tensors(module: nn.Module) -> dict[int, list[str]]:
    """id of every tensor (parameter or buffer) with more than one name -> its names, in module order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in _named_tensors(module):
        groups.setdefault(id(tensor), []).append(name)
    return {key: names for key, names in groups.items() if len(names) > 1}


def tied_groups(module: nn.Module) -> list[list[str]]:
    return list(tied_tensors(module).values())


def tied_to(module: nn.Module, selected: Iterable[str]) -> list[list[str]]:
    """The tied groups of parameters with a name in ``selected``, each led by its first selected name."""
    order = {name: index for index, name in enumerate(selected)}
    if not order:
        return []
    groups: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    found = []
    for names in groups.values():
        chosen = sorted((n for n in names if n in order), key=order.__getitem__)[:1]
        if len(names) > 1 and chosen:
            found.append(chosen + [n for n in names if n != chosen[0]])
    return found


def newly_trained_ties(module: nn.Module, trainable_before: set[int], scopes: list[str]) -> list[list[str]]:
    """Tied groups whose tensor became trainable since ``trainable_before`` (ids of parameters), each
    led by a name under the rule's region ``scopes`` when there is one (the name the rule selected)."""
    trained = [
        name
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if parameter.requires_grad and id(parameter) not in trainable_before
    ]
    inside = [n for n in trained if any(not scope or n.startswith(scope + ".") for scope in scopes)]
    return tied_to(module, inside + [n for n in trained if n not in inside])


def one_copy(tensors: dict[str, torch.Tensor], module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` (a state dict of ``module``) with each tied tensor under its first name only, and
    {left-out name: the name kept}."""
    aliases = {alias: names[0] for names in tied_groups(module) for alias in names[1:] if alias in tensors}
    return {name: t for name, t in tensors.items() if name not in aliases}, aliases


def with_aliases(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """``tensors`` with every left-out tied name again, the same tensor as the name kept."""
    return tensors | {alias: tensors[kept] for alias, kept in aliases.items() if kept in tensors}
