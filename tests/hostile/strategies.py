"""Hypothesis strategies for rule files: valid documents in every shape docs/rules.md allows, with
one to three positions changed to hostile values (tests/test_fuzz.py).

    rule_documents("numbers")   a rule file (as Python data) with hostile numbers somewhere
    to_yaml(document)           its flow-style YAML text; Raw(...) values are written as they are
    paths(doc), mutate(...)     every position of a document, and a copy with one changed
"""

from __future__ import annotations

import copy
import json
import math

from hypothesis import strategies as st

from hostile import files


class Raw(str):
    """YAML text written as it is (aliases, deep nesting, 5,000-digit integers)."""

    def __repr__(self) -> str:  # falsifying examples stay readable
        return f"Raw({str.__repr__(self[:80])}{'...' if len(self) > 80 else ''}, {len(self):,} characters)"


# -- rule files -------------------------------------------------------------------------------------
def to_yaml(value) -> str:
    """Flow-style YAML for plain values; floats keep YAML 1.1's spelling (.inf, .nan, 1.0e+300)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return f"{value:.17e}"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are YAML's double-quoted escapes
    if isinstance(value, list):
        return "[" + ", ".join(to_yaml(item) for item in value) + "]"
    return "{" + ", ".join(f"{to_yaml(str(k))}: {to_yaml(v)}" for k, v in value.items()) + "}"


PREDICATE = {
    "kind": ["linear", "conv"],
    "op": "Linear",
    "class": "Linear",
    "scope": "**.qkv",
    "inside": "blocks.*",
    "rank": 3,
    "shape": [None, None, 16],
    "dtype": "float32",
    "attr": {"in_features": 16},
    "pointwise": True,
    "module": True,
    "data_inputs": 1,
    "any_of": [{"kind": "linear"}, {"depthwise": False}],
    "not": {"feeds_output": True},
}
GRAPH = {
    "nodes": {"fc1": {"kind": "linear"}, "act": {"kind": "act"}, "fc2": {"kind": "linear"}},
    "edges": ["fc1 ->* act", "act ->* fc2"],
    "through": ["act", "dropout", {"kind": "add", "data_inputs": 1}],
    "where": [{"same_channels": ["fc1.in", "fc2.out"]}, {"all_paths": ["fc1", "fc2"]}],
    "anchor": "fc2",
    "output": "fc2",
}
TEMPLATES = [
    {
        "version": 1,
        "description": "adapters",
        "rules": [
            {"name": "mha", "match": "attention", "tuner": "parallel_adapter", "position": "parallel",
             "settings": {"hidden": 8, "activation": "relu", "scale": 1.0, "dropout": 0.0},
             "scope": "blocks.*.attn", "layers": "0:2"},
            {"name": "ffn", "match": "ffn", "tuner": "sequential_adapter", "settings": {"hidden": 4},
             "first": 1, "last": 1, "every": 1, "exclude": {"layers": [5]}},
        ],
    },
    {
        "version": 1,
        "patterns": {"p": {"node": PREDICATE, "within": "attention", "description": "linears"}},
        "rules": [
            {"name": "lora", "match": "p", "tuner": "lora", "settings": {"rank": 4, "alpha": 16.0, "dropout": 0.1},
             "train": "biases"},
            {"name": "plain", "match": {"node": {"kind": "conv"}}, "tuner": "lora", "fallback_for": "lora"},
        ],
    },
    {
        "version": 1,
        "patterns": {"m": {"graph": GRAPH, "outside": "attention"}, "s": {"scope": "blocks.*"}},
        "rules": [
            {"name": "prefix", "match": {"any_of": ["attention", {"pattern": "m"}]}, "tuner": "prefix",
             "settings": {"length": 4, "reparam_hidden": 0, "parallel": True}},
            {"name": "vpt", "match": {"block": {"contains": ["attention"]}}, "tuner": "prompt",
             "settings": {"length": 2, "deep": True}},
            {"name": "ss", "match": {"residual": {"contains": ["m"]}}, "tuner": "scale_shift",
             "settings": {"shift": False}},
            {"name": "head", "match": "head", "tuner": "head", "settings": {"num_classes": 10}, "train": ["head.*"]},
            {"name": "bias", "match": "s", "tuner": "bitfit"},
        ],
    },
]  # fmt: skip

NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, -(2**63), 2**31, 2**63, 10**12, 10**100]),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324, 0.5]),
    st.integers(),
    st.floats(),
    st.just(Raw("9" * 5000)),
)
TEXTS = st.one_of(
    st.sampled_from(["", " ", "**", "a-b", "a_b", "../../etc/passwd", "${HOME}", "!!python/object", "%s%n", "\x00"]),
    st.integers(1, 40).map(lambda n: "*" * n + "b"),
    st.integers(1, 12).map(lambda n: ".".join(["*"] * n) + ".b"),
    st.sampled_from([1_000, 100_000]).map(lambda n: "n" * n),
    st.text(max_size=20),
    st.just(Raw('"\\ud800"')),  # a lone surrogate: printing it as UTF-8 fails
)
NESTING = st.one_of(
    st.builds(files.laughs, st.integers(2, 7), st.integers(2, 9), st.booleans()).map(Raw),
    st.builds(files.deep, st.sampled_from(["not", "any_of", "list"]), st.sampled_from([10, 100, 1000, 3000])).map(Raw),
    st.sampled_from([10, 1000]).map(files.deep_pattern).map(Raw),
)
STRUCTURE = st.one_of(st.none(), st.booleans(), st.just([]), st.just({}), st.just([[[]]]), st.just({"k": {}}))
HOSTILE = {"numbers": NUMBERS, "texts": TEXTS, "nesting": NESTING, "structure": STRUCTURE}


def paths(value, prefix=()):
    """Every position in a document: (key or index, ...) tuples, containers and leaves."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def mutate(document, path, action: str, value):
    """A copy of ``document`` with the value at ``path`` replaced, deleted or joined by an unknown key."""
    document = copy.deepcopy(document)
    if not path:
        return value if action == "replace" else document
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if action == "delete":
        del parent[path[-1]]
    elif action == "sibling" and isinstance(parent, dict):
        parent["unknown_key"] = value
    else:
        parent[path[-1]] = value
    return document


@st.composite
def rule_documents(draw, hostile: str, templates=TEMPLATES):
    """A valid rule file with one to three positions changed to hostile values."""
    document = draw(st.sampled_from(templates))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(document))))
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "sibling"]))
        document = mutate(document, path, action, draw(HOSTILE[hostile]))
    return document


def non_finite(value) -> bool:
    """Whether a NaN or an infinity is anywhere in ``value``."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(non_finite(v) for v in value)
    return False
