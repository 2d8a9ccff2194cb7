"""A structure-aware fuzzer for what users and attackers hand in: rule files, tuned artifacts, checkpoints.

Each strategy starts from something valid (a rule file in every shape docs/rules.md allows,
the manifest of a real tiny artifact, the state of a real tiny checkpoint) and changes a
field or two to a hostile value: huge, negative, NaN or infinite numbers, 5,000-digit
integers, long and unicode names, NUL bytes, globs of many stars, deep nesting, YAML alias
bombs, wrong types, deleted keys. Every outcome must be success or one clean line:
``load_rules`` raises only UtuneError (located ``file:line:col``), ``cli.main`` returns 0, 2
or 3 with one ``error:`` line and no traceback, all within a deadline and a memory bound
(each call runs in a forked child: tests/hostile/bounded.py). Where the issue promises a
refusal (non-finite numbers, a hand-edited sealed manifest, a checkpoint's progress out of
range) success is a failure too, and an artifact never runs the code its manifest names.

derandomize=True: CI runs the same examples every time; shrinking is off because a shrink
step that hangs costs a whole deadline (the failing example is reported as generated).
UTUNE_FX_FUZZ_SCALE=N runs N times as many examples, for a deeper search by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
from hostile import files
from hostile.bounded import CLEAN, classify, run_bounded
from hostile.strategies import HOSTILE, TEMPLATES, mutate, non_finite, paths, rule_documents, to_yaml
from hostile.workspace import SPEC, Workspace, reseal, resume_argv
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from utune_fx.cli import main
from utune_fx.errors import UtuneError
from utune_fx.match import load_rules, match_rules
from utune_fx.specs import load_model
from utune_fx.trace import trace

DEADLINE_S, MEMORY_MB = 20, 500
# UTUNE_FX_FUZZ_SCALE=10 runs ten times the examples (a deeper search than CI's, same seeds first)
SCALE = max(1, int(os.environ.get("UTUNE_FX_FUZZ_SCALE", "1")))
FUZZ = settings(
    derandomize=True,
    deadline=None,  # each example forks and may build a model; the bound is the child's deadline
    phases=(Phase.explicit, Phase.generate),
    database=None,
    # module-scoped fixtures only; the data strategies draw large values (10**5-character names) on purpose
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def _load(path: Path, graph=None) -> int:
    """load_rules (and match_rules on ``graph``) as the CLI reports them: 0, or one ``error:`` line
    and 2; anything else escapes."""
    try:
        rules = load_rules(path)
        if graph is not None:
            match_rules(graph, rules)
    except UtuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _check_rule_file(text: str, must_fail: bool, graph=None) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "rules.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        outcome = run_bounded(lambda: _load(path, graph), timeout_s=DEADLINE_S, memory_mb=MEMORY_MB)
    kind = classify(outcome, must_fail=must_fail, memory_mb=MEMORY_MB)
    shown = text[:300] if len(text) < 2000 else f"{text[:300]!r}... ({len(text):,} characters)"
    assert kind == CLEAN, f"{kind}: {outcome.describe()}\nrule file:\n{shown}"
    if outcome.returncode == 2:
        line = outcome.error_lines()[0]
        assert re.match(r"error: \S*\.yaml:\d+:\d+: ", line), f"not located at file:line:col: {line[:300]}"


@pytest.fixture(scope="module")
def graph():
    """The tiny ViT of the corpus, traced once; forked children match rule files against it."""
    loaded = load_model(SPEC)
    return trace(loaded.model, loaded.inputs, name=loaded.name)


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_rule_files_with_hostile_values_load_and_match_or_fail_in_one_located_line(hostile, graph):
    @settings(FUZZ, max_examples=30 * SCALE)
    @given(rule_documents(hostile))
    def check(document):
        _check_rule_file(to_yaml(document), must_fail=non_finite(document), graph=graph)

    check()


@settings(FUZZ, max_examples=25 * SCALE)
@given(
    st.sampled_from([to_yaml(t) for t in TEMPLATES]),
    st.sampled_from(
        ["\x00", "\ufeff", "\t", "&a", "*a", "!!python/name:os.system", "{", "]", "\\", "\x85", "%YAML 1.1"]
    ),
    st.floats(0, 1),
    st.booleans(),
)
def test_rule_file_bytes_with_a_foreign_character_or_cut_short_fail_cleanly(template, insert, where, truncate):
    position = int(where * len(template))
    text = template[:position] if truncate else template[:position] + insert + template[position:]
    _check_rule_file(text, must_fail=False)


@settings(FUZZ, max_examples=20 * SCALE)
@given(
    st.sampled_from(["scope", "class", "inside", "op"]),
    st.integers(1, 30),
    st.sampled_from(["b", "*b", ".b", "**.b", "[b"]),
    st.sampled_from(["node", "rule scope", "scope form"]),
)
def test_globs_of_many_stars_match_within_the_bound(graph, key, count, tail, where):
    glob = "*" * count + tail
    if where == "node":
        rule = files.rule(match="{node: {" + key + ": " + to_yaml(glob) + "}}", tuner="lora", settings=None)
    elif where == "rule scope":
        rule = files.rule(extra=f"scope: {to_yaml(glob)}")
    else:
        rule = files.rule(match="{scope: " + to_yaml(glob) + "}")
    _check_rule_file(files.rule_file(rule), must_fail=False, graph=graph)


# -- tuned artifacts and checkpoints ----------------------------------------------------------------
@pytest.fixture(scope="module")
def space(tmp_path_factory):
    workspace = Workspace(tmp_path_factory.mktemp("fuzz"))
    workspace.artifact(workspace.root / "warm-up")  # builds the originals and imports timm before the forks
    workspace.run(workspace.root / "warm-up-run")
    return workspace


DAMAGE = ("delete", "wrong type", "huge", "nested", "nan", "code")
_WRONG_TYPES = [None, True, 0, -1, 1.5, "x", [], {}, [1, "a"], {"x": 1}]


def damaged(value, damage: str, marker: Path, draw, path=()):
    """``value`` damaged the way ``damage`` names (None for delete); ``code`` is a model spec that runs
    code, or for a rule source a YAML text that would call code through a Python tag."""
    if damage == "wrong type":
        return draw(st.sampled_from([v for v in _WRONG_TYPES if type(v) is not type(value)]))
    if damage == "huge":
        return draw(st.sampled_from([10**30, -(10**30), "x" * 10**6, [0] * 10**5, 1e308]))
    if damage == "nested":
        return draw(
            st.sampled_from([[[[[[[[[[[[[]]]]]]]]]]]], json.loads("[" * 60 + "]" * 60), {"a": {"b": {"c": {}}}}])
        )
    if damage == "nan":
        return draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if path[-1:] == ("model",):
        return draw(st.sampled_from([f"os:system?command=touch+{marker}", f"{marker}.py:build", "builtins:exec"]))
    return draw(
        st.sampled_from(
            [
                f"!!python/object/apply:os.system ['touch {marker}']\n",
                "version: 1\nrules: [{name: r, match: !!python/name:os.system , tuner: lora}]\n",
                f"version: 1\ndescription: !!python/object/new:os.system ['touch {marker}']\nrules: []\n",
            ]
        )
    )


@st.composite
def damage_plans(draw, document, code: bool = True):
    """(path, damage, resealed) for one field of ``document``; ``code`` targets the model spec and the rule texts."""
    damage = draw(st.sampled_from(DAMAGE if code else DAMAGE[:-1]))
    sources = [p for p in paths(document) if len(p) == 4 and p[0] == "rules" and p[2] == "sources"]
    candidates = [p for p in paths(document) if p] if damage != "code" else [("model",), *sources]
    path = draw(st.sampled_from(candidates))
    return path, damage, draw(st.booleans())


def _apply(document, path, damage, marker, draw):
    """``document`` with the field at ``path`` damaged; and the value it had."""
    current = document
    for step in path:
        current = current[step]
    value = None if damage == "delete" else damaged(current, damage, marker, draw, path)
    return mutate(document, path, "delete" if damage == "delete" else "replace", value), current


def _damage_json(file: Path, folder: Path, data, code: bool):
    """Damage one field of the JSON file in place: (field path, damage, resealed?, the value it had)."""
    document = json.loads(file.read_text())
    path, damage, resealed = data.draw(damage_plans(document, code=code))
    changed, before = _apply(document, path, damage, folder / "MARKER", data.draw)
    file.write_text(json.dumps(changed))
    return path, damage, resealed, before


def _run_damaged(argv, folder: Path, must_fail: bool, context: str) -> None:
    outcome = run_bounded(lambda: main(argv), timeout_s=DEADLINE_S, memory_mb=MEMORY_MB, cwd=folder)
    kind = classify(outcome, must_fail=must_fail, memory_mb=MEMORY_MB, marker=folder / "MARKER")
    assert kind == CLEAN, f"{kind}: {context}: cli.py {' '.join(argv)[:300]} -> {outcome.describe()}"


@settings(FUZZ, max_examples=25 * SCALE)
@given(data=st.data())
def test_a_manifest_with_a_damaged_field_fails_cleanly_and_never_runs_code(space, data):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        artifact = space.artifact(folder / "tuned")
        path, damage, resealed, before = _damage_json(artifact / "manifest.json", folder, data, code=True)
        if resealed:
            reseal(artifact)  # an attacker recomputes every hash the artifact carries
        # a hand edit is refused unless resealed; NaN cannot be resealed; code is never run
        must_fail = damage in ("nan", "code") or not resealed
        context = f"manifest {'.'.join(map(str, path))} {damage} (was {str(before)[:60]}), resealed {resealed}"
        _run_damaged(["fold", str(artifact), "-o", str(folder / "out")], folder, must_fail, context)


def _progress_counter(path) -> bool:
    """The checkpoint's epoch or step: any damage to them is progress the run cannot have made."""
    return len(path) == 2 and path[0] == "progress" and path[1] in ("epoch", "step")


@settings(FUZZ, max_examples=20 * SCALE)
@given(data=st.data())
def test_a_checkpoint_with_a_damaged_field_fails_cleanly(space, data):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        run = space.run(folder / "run")
        path, damage, _, before = _damage_json(run / "checkpoint" / "state.json", folder, data, code=False)
        context = f"state.json {'.'.join(map(str, path))} {damage} (was {str(before)[:60]})"
        argv = resume_argv(run)
        _run_damaged(argv, folder, damage == "nan" or _progress_counter(path), context)


def _damage_header(path: Path, data) -> str:
    """Damage one field of a safetensors file's JSON header (the tensor data stays); a description."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    field, damage, _ = data.draw(damage_plans(header, code=False))
    changed, before = _apply(header, field, damage, path, data.draw)
    text = json.dumps(changed).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    return f"{path.name} header {'.'.join(map(str, field))} {damage} (was {str(before)[:60]})"


@settings(FUZZ, max_examples=10 * SCALE)
@given(data=st.data())
def test_a_tensor_file_with_a_damaged_header_is_refused_cleanly(space, data):
    """safetensors headers are JSON too: a wrong shape, dtype, offset or name never loads, and never crashes."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if data.draw(st.booleans(), label="artifact (else checkpoint)"):
            artifact = space.artifact(folder / "tuned")
            context = _damage_header(artifact / "tuners.safetensors", data)
            reseal(artifact)  # past the tensors' sha256, to the reader
            argv = ["fold", str(artifact), "-o", str(folder / "out")]
        else:
            run = space.run(folder / "run")
            context = _damage_header(run / "checkpoint" / "tensors.safetensors", data)
            argv = resume_argv(run)
        _run_damaged(argv, folder, True, context)
