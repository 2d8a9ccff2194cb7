"""Rule files: shipped ones load; malformed ones give one located line; fuzzing
never gets anything but a located RuleError out of the loader."""

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utune_fx.match import RuleError, load_rules
from utune_fx.match.predicates import PREDICATE_KEYS
from utune_fx.match.rules import PRELUDE, RULE_KEYS, TOP_KEYS
from utune_fx.tuners import TUNERS

RULES = Path(__file__).resolve().parents[1] / "rules"
LOCATED = re.compile(r"^\S+:\d+:\d+: ")


@pytest.mark.parametrize("path", sorted(RULES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_rule_files_load(path):
    rules = load_rules(path)
    assert rules.rules and all(rule.tuner in TUNERS for rule in rules.rules)


def _load(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return load_rules(path)


GOOD_RULE = """
    version: 1
    rules:
      - name: mha
        match: attention
        tuner: parallel_adapter
    """

ERRORS = [
    ("version: 1\nrules: [oops", r"bad\.yaml:2:\d+: invalid YAML"),
    ("", r"bad\.yaml:1:1: the rule file is empty; start with 'version: 1'"),
    ("rules: []\n", r"bad\.yaml:1:1: \(top level\): missing key 'version'"),
    ("version: 2\nrules: []\n", r"bad\.yaml:1:10: version: unsupported version 2"),
    ("version: 1\nrulez: []\n", r"bad\.yaml:2:1: rulez: unknown key 'rulez'; did you mean 'rules'\?"),
    ("version: 1\n", r"bad\.yaml:1:1: \(top level\): missing key 'rules'"),
    ("version: 1\nrules: []\n", r"bad\.yaml:2:8: rules: the rules list is empty"),
    (
        GOOD_RULE.replace("tuner: parallel_adapter", "tuner: paralel_adapter"),
        r"bad\.yaml:5:12: rules\[0\]\.tuner: unknown tuner 'paralel_adapter'; did you mean 'parallel_adapter'\? valid: ",
    ),
    (
        GOOD_RULE.replace("match: attention", "match: atention"),
        r"bad\.yaml:4:12: rules\[0\]\.match: unknown pattern 'atention'; did you mean 'attention'\?",
    ),
    (
        GOOD_RULE + "    settings: {hiden: 8}\n",
        r"bad\.yaml:6:16: rules\[0\]\.settings\.hiden: unknown setting 'hiden' for tuner parallel_adapter; did you mean 'hidden'\?",
    ),
    (
        GOOD_RULE + "    settings: {hidden: 0}\n",
        r"bad\.yaml:6:24: rules\[0\]\.settings\.hidden: hidden must be a positive integer, got 0 \(bottleneck width",
    ),
    (
        GOOD_RULE + "    position: prefix\n",
        r"bad\.yaml:6:15: rules\[0\]\.position: tuner parallel_adapter works at position parallel, not 'prefix'",
    ),
    (GOOD_RULE + "    layers: 'a:b'\n", r"bad\.yaml:6:13: rules\[0\]\.layers: bad layers 'a:b'"),
    (GOOD_RULE + "    exclude: {}\n", r"bad\.yaml:6:14: rules\[0\]\.exclude: exclude needs one of scope"),
    (
        GOOD_RULE + "    tunner: lora\n",
        r"bad\.yaml:6:5: rules\[0\]\.tunner: unknown key 'tunner'; did you mean 'tuner'\?",
    ),
    (
        GOOD_RULE + "  - {name: mha, match: ffn, tuner: lora}\n",
        r"bad\.yaml:6:12: rules\[1\]\.name: rule name 'mha' is used twice",
    ),
    ("version: 1\nrules:\n  - {match: attention, tuner: lora}\n", r"bad\.yaml:3:5: rules\[0\]: missing key 'name'"),
    (
        "version: 1\npatterns:\n  p: {node: {kind: lineer}}\nrules: [{name: r, match: p, tuner: lora}]\n",
        r"bad\.yaml:3:20: patterns\.p\.node\.kind: unknown op kind 'lineer'; did you mean 'linear'\? valid: linear, conv",
    ),
    (
        "version: 1\npatterns:\n  p: {node: {kind: linear}, graph: {}}\nrules: [{name: r, match: p, tuner: lora}]\n",
        r"bad\.yaml:3:6: patterns\.p: a pattern needs exactly one of node, graph",
    ),
    (
        "version: 1\npatterns:\n  p: {graph: {nodes: {a: {}}, edges: ['a => b']}}\nrules: [{name: r, match: p, tuner: lora}]\n",
        r"bad\.yaml:3:39: patterns\.p\.graph\.edges\[0\]: bad edge 'a => b'; write 'a -> b'",
    ),
    (
        "version: 1\npatterns:\n  p: {graph: {nodes: {a: {}}, edges: ['a -> b']}}\nrules: [{name: r, match: p, tuner: lora}]\n",
        r"patterns\.p\.graph\.edges\[0\]: edge names 'b', which is not in nodes \(a\)",
    ),
    (
        "version: 1\npatterns:\n  p: {graph: {nodes: {a: {}}, edges: [], where: [{not_gating: [a, b]}]}}\n"
        "rules: [{name: r, match: p, tuner: lora}]\n",
        r"patterns\.p\.graph\.where\[0\]\.not_gating: expected a non-empty string, got a list",
    ),
    (
        "version: 1\npatterns:\n  p: {pattern: q}\n  q: {pattern: p}\nrules: [{name: r, match: p, tuner: lora}]\n",
        r"bad\.yaml:3:6: patterns\.p: patterns refer to each other in a cycle: p -> q -> p",
    ),
    (
        "version: 1\npatterns:\n  attention: {node: {kind: linear}}\nrules: [{name: r, match: attention, tuner: lora}]\n",
        r"bad\.yaml:3:3: patterns\.attention: pattern 'attention' is already defined at .*prelude\.yaml:\d+:\d+; pick another name",
    ),
    (
        "version: 1\nimports: [missing.yaml]\nrules: []\n",
        r"bad\.yaml:2:11: imports\[0\]: imported file 'missing.yaml' not found",
    ),
    ("version: 1\nversion: 1\n", r"bad\.yaml:2:1: version: key given twice; keep one"),
    ("!!python/object/apply:os.system ['echo hi']\n", r"bad\.yaml:1:1: .*(not allowed|constructor)"),
    (
        "version: 1\nrules:\n  - name: r\n    match: {node: {rank: two}}\n    tuner: lora\n",
        r"bad\.yaml:4:26: rules\[0\]\.match\.node\.rank: rank must be an integer",
    ),
    (
        GOOD_RULE + "    fallback_for: mha\n",  # a rule cannot stand in for itself, nor for a later rule
        r"bad\.yaml:6:19: rules\[0\]\.fallback_for: fallback_for names rule 'mha', which is not defined above this "
        r"rule; rules above: none",
    ),
]


@pytest.mark.parametrize("text,message", ERRORS, ids=[f"error{i}" for i in range(len(ERRORS))])
def test_malformed_rule_files_give_one_located_line(tmp_path, text, message):
    with pytest.raises(RuleError, match=message) as caught:
        _load(tmp_path, text)
    assert "\n" not in str(caught.value)


def test_missing_rule_file(tmp_path):
    with pytest.raises(RuleError, match=r"nope\.yaml: rule file not found"):
        load_rules(tmp_path / "nope.yaml")


def test_imports_share_patterns(tmp_path):
    (tmp_path / "lib.yaml").write_text("version: 1\npatterns:\n  qkv: {node: {kind: linear, scope: '**.qkv'}}\n")
    (tmp_path / "main.yaml").write_text(
        "version: 1\nimports: [lib.yaml]\nrules: [{name: r, match: qkv, tuner: lora}]\n"
    )
    assert load_rules(tmp_path / "main.yaml").rules[0].pattern.name == "qkv"


# -- fuzzing: anything in, only located RuleErrors out --------------------------------

KEYS = list(TOP_KEYS + RULE_KEYS + PREDICATE_KEYS) + [
    "node",
    "graph",
    "nodes",
    "edges",
    "within",
    "any_of",
    "residual",
    "block",
    "contains",
    "where",
    "hidden",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False, width=16),
    st.sampled_from(["attention", "ffn", "lora", "linear", "a ->* b", "0:2", "blocks.*", "**", "x"]),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)
    ),
    max_leaves=25,
)


def _assert_only_located_errors(tmp_path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_rules(path)
    except RuleError as error:
        assert LOCATED.match(str(error)) or str(error).startswith(str(path)), str(error)
        assert "\n" not in str(error)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_random_rule_documents_only_raise_located_rule_errors(tmp_path, document):
    _assert_only_located_errors(
        tmp_path, yaml.safe_dump({"version": 1, **document} if isinstance(document, dict) else document)
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("version: 1\nrules:- {}[]&*!|>'\"#attention,tuner")), max_size=80))
def test_random_text_only_raises_located_rule_errors(tmp_path, text):
    _assert_only_located_errors(tmp_path, text)


def test_prelude_is_a_valid_pattern_library():
    assert PRELUDE.is_file()


@pytest.mark.parametrize("path", sorted(RULES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_rule_files_state_formula_and_paper_setting(path):
    header = path.read_text().split("version:")[0]
    assert (
        header.startswith("# ")
        and "=" in header
        and "Paper setting" in header.replace("paper setting", "Paper setting")
    )
