"""Globs on module paths and class names, matched without backtracking.

    ScopeGlob("blocks.*.attn").fullmatch("blocks.3.attn")     '*': one path segment, or part of one
    ScopeGlob("layers.**.mlp").fullmatch("layers.0.1.mlp")    '**': any number of segments
    ScopeGlob("**")                                           everything, the model itself ('') included
    ClassGlob("timm.*.Block").fullmatch("timm.models.vision_transformer.Block")   '*': any characters

A glob turned into a regular expression ('*' -> '[^.]*') backtracks
exponentially on a glob of many stars that fails ('******...b' against a
long name hangs). Here a star is matched greedily and, on a mismatch, only
the latest star takes one more character: O(len(glob) * len(text)) at worst.
The same algorithm matches segments against '**' in a path. Results are
cached per text, as a model repeats its scopes on many nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
P = TypeVar("P")


def _wildcard(pattern: Sequence[P], text: Sequence[T], is_star: Callable[[P], bool], fits: Callable[[P, T], bool]):
    """Does ``pattern`` match all of ``text``? Stars match any run of items, every other
    pattern item matches one item it ``fits``. Greedy with one restart point (the last
    star seen), which is exact for this language and never backtracks further."""
    p = t = 0
    star, star_t = -1, 0  # the last star's position in pattern, and where in text it started
    while t < len(text):
        if p < len(pattern) and not is_star(pattern[p]) and fits(pattern[p], text[t]):
            p, t = p + 1, t + 1
        elif p < len(pattern) and is_star(pattern[p]):
            star, star_t = p, t
            p += 1
        elif star >= 0:  # let the last star take one more item, and retry after it
            star_t += 1
            p, t = star + 1, star_t
        else:
            return False
    return all(is_star(item) for item in pattern[p:])


def _collapse(glob: str) -> str:
    """Runs of '*' mean what one '*' means; collapsing them keeps the work small."""
    while "**" in glob:
        glob = glob.replace("**", "*")
    return glob


def _chars_match(glob: str, text: str) -> bool:
    """One segment: '*' any run of characters, '?' one character, the rest literal."""
    return _wildcard(glob, text, lambda c: c == "*", lambda c, t: c == "?" or c == t)


class ScopeGlob:
    """A module-path glob: '*' matches within one segment, '**' (a whole segment) any number of
    non-empty segments, '?' one character."""

    def __init__(self, glob: str):
        self.glob = glob
        self.segments = [s if s == "**" else _collapse(s) for s in glob.split(".")]
        self._cache: dict[str, bool] = {}

    def fullmatch(self, path: str) -> bool:
        if path not in self._cache:
            self._cache[path] = self._match(path)
        return self._cache[path]

    def _match(self, path: str) -> bool:
        if self.glob == "**":
            return True
        is_star = "**".__eq__
        return _wildcard(self.segments, path.split("."), is_star, lambda glob, segment: _chars_match(glob, segment))

    def __repr__(self) -> str:
        return f"ScopeGlob({self.glob!r})"


class ClassGlob:
    """A class-name glob: '*' matches any characters (dots included), everything else is literal."""

    def __init__(self, glob: str):
        self.glob = _collapse(glob)
        self._cache: dict[str, bool] = {}

    def fullmatch(self, name: str) -> bool:
        if name not in self._cache:
            self._cache[name] = _wildcard(self.glob, name, lambda c: c == "*", lambda c, t: c == t)
        return self._cache[name]

    def __repr__(self) -> str:
        return f"ClassGlob({self.glob!r})"
