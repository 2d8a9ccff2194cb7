"""Rule files are bounded data (issue 15): hostile files end in one located line, with bounded work.

Each hostile input of the probe is generated here (nothing large is committed). Work is
bounded by counting it (values converted, YAML nodes composed, wildcard comparisons, graph
search steps) against the limit in force, often a small one set through its environment
variable, rather than by timing it.
"""

import dataclasses
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from utune_fx.errors import UtuneError
from utune_fx.match import RuleError, limits, load_rules, match_rules, source
from utune_fx.match import globs as glob_module
from utune_fx.match.globs import ClassGlob, ScopeGlob
from utune_fx.trace import trace
from utune_fx.tuners import TUNERS, TunerConfig, create_config, register_tuner

LOCATED = re.compile(r"^\S+:\d+:\d+: \S.*: ")


def _write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _refused(path: Path, message: str, limit: limits.Limit | None = None) -> str:
    """load_rules refuses with one located line matching ``message`` (naming the limit's variable)."""
    with pytest.raises(RuleError, match=message) as caught:
        load_rules(path)
    text = str(caught.value)
    assert "\n" not in text and LOCATED.match(text), text
    if limit is not None:
        assert f"set {limit.env} above {limit.value()}" in text
    return text


@pytest.fixture
def counted(monkeypatch):
    """Counts the YAML values composed and converted (alias expansions included)."""
    counts = {"composed": 0, "converted": 0}
    compose, convert = source._BoundedLoader.compose_node, source._Converter.convert

    def counting_compose(self, *args):
        counts["composed"] += 1
        return compose(self, *args)

    def counting_convert(self, *args):
        counts["converted"] += 1
        return convert(self, *args)

    monkeypatch.setattr(source._BoundedLoader, "compose_node", counting_compose)
    monkeypatch.setattr(source._Converter, "convert", counting_convert)
    return counts


# -- alias expansion ("billion laughs") ------------------------------------------------------


def _laughs(levels: int, width: int, indent: str, mapping: bool) -> list[str]:
    """Anchors a0..a{levels-1}, each holding ``width`` aliases of the one before."""
    lines = [f"{indent}a0: &a0 {{k: v}}" if mapping else f"{indent}- &a0 [lol, lol]"]
    for level in range(1, levels):
        if mapping:
            inner = ", ".join(f"k{j}: *a{level - 1}" for j in range(width))
            lines.append(f"{indent}a{level}: &a{level} {{{inner}}}")
        else:
            lines.append(f"{indent}- &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return lines


RULE = "  - {name: r, match: attention, tuner: parallel_adapter}"
LAUGHS = {
    "rules": "version: 1\nrules:\n" + "\n".join(_laughs(9, 9, "  ", mapping=False)) + "\n",
    "description": "version: 1\ndescription:\n" + "\n".join(_laughs(9, 9, "  ", mapping=True)) + f"\nrules:\n{RULE}\n",
    "settings": "version: 1\nrules:\n  - name: r\n    match: attention\n    tuner: parallel_adapter\n    settings:\n"
    + "\n".join(_laughs(9, 9, "      ", mapping=True))
    + "\n",
    "mappings_only": "version: 1\npatterns:\n  p:\n    node:\n      attr:\n"
    + "\n".join(_laughs(9, 9, "        ", mapping=True))
    + "\nrules:\n  - {name: r, match: p, tuner: lora}\n",
}


@pytest.mark.parametrize("where", LAUGHS)
def test_alias_expansion_is_refused_within_the_value_budget(tmp_path, counted, monkeypatch, where):
    monkeypatch.setenv(limits.RULE_VALUES.env, "500")
    _refused(_write(tmp_path, LAUGHS[where]), r"more than 500 values once aliases are expanded", limits.RULE_VALUES)
    assert counted["converted"] <= 501 + 700  # this file's budget, plus the prelude's values (read first)


def test_alias_expansion_inside_an_imported_pattern_file(tmp_path, counted):
    lib = "version: 1\npatterns:\n  p:\n    node:\n      attr:\n" + "\n".join(_laughs(9, 9, "        ", True)) + "\n"
    _write(tmp_path, lib, "lib.yaml")
    main = _write(tmp_path, "version: 1\nimports: [lib.yaml]\nrules:\n  - {name: r, match: p, tuner: lora}\n")
    text = _refused(main, r"more than 20,000 values once aliases are expanded", limits.RULE_VALUES)
    assert text.startswith(str(tmp_path / "lib.yaml") + ":")
    assert counted["converted"] <= 3 * limits.RULE_VALUES.default  # not 9**9


def test_a_million_values_written_out_stop_at_the_budget_while_composing(tmp_path, counted, monkeypatch):
    monkeypatch.setenv(limits.RULE_VALUES.env, "1000")
    monkeypatch.setenv(limits.RULE_FILE_BYTES.env, str(3 * 10**6))
    path = _write(tmp_path, "version: 1\nrules: [" + "1," * 10**6 + "]\n")
    _refused(path, r"bad\.yaml:2:\d+: rules\[\d+\]: more than 1,000 values", limits.RULE_VALUES)
    assert counted["composed"] <= 1000 + 700  # the composer stopped; the prelude's values are counted too


# -- size, nesting, numbers, text ------------------------------------------------------------


def test_a_10_mb_file_of_120000_rules_is_refused_by_its_size(tmp_path):
    path = _write(tmp_path, "version: 1\nrules:\n" + "  - {name: r, match: attention, tuner: lora}\n" * 120_000)
    _refused(path, r"bad\.yaml:\d+:\d+: \(top level\): the file has more than 262,144 bytes", limits.RULE_FILE_BYTES)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_dev_zero_is_read_only_up_to_the_byte_limit():
    """/dev/zero reports a size of 0 and never ends: reading it whole ran out of memory."""
    with pytest.raises(RuleError, match=r"^/dev/zero:1:262145: \(top level\): the file has more than 262,144 bytes"):
        load_rules("/dev/zero")


def test_too_many_rules(tmp_path):
    path = _write(
        tmp_path,
        "version: 1\nrules:\n" + "".join(f"  - {{name: r{i}, match: attention, tuner: lora}}\n" for i in range(1001)),
    )
    _refused(path, r"bad\.yaml:1003:5: rules\[1000\]: more than 1000 rules", limits.RULES_PER_FILE)


def test_too_many_patterns(tmp_path, monkeypatch):
    monkeypatch.setenv(limits.RULE_PATTERNS.env, "100")  # the prelude's count too
    patterns = "".join(f"  p{i}: {{node: {{kind: linear}}}}\n" for i in range(100))
    path = _write(tmp_path, f"version: 1\npatterns:\n{patterns}rules:\n  - {{name: r, match: p0, tuner: lora}}\n")
    _refused(path, r"bad\.yaml:\d+:3: patterns\.p\d+: more than 100 patterns", limits.RULE_PATTERNS)


def test_too_many_imported_files(tmp_path):
    for i in range(40):
        _write(tmp_path, f"version: 1\nimports: [f{i + 1}.yaml]\n" if i < 39 else "version: 1\n", f"f{i}.yaml")
    path = _write(tmp_path, "version: 1\nimports: [f0.yaml]\nrules:\n  - {name: r, match: attention, tuner: lora}\n")
    _refused(path, r"f30\.yaml:2:11: imports\[0\]: more than 32 files", limits.RULE_FILES)


def test_long_chains_of_pattern_references(tmp_path):
    chain = "".join(f"  p{i}: {{node: {{}}, within: p{i - 1}}}\n" for i in range(1, 200))
    path = _write(
        tmp_path,
        f"version: 1\npatterns:\n  p0: {{node: {{}}}}\n{chain}rules:\n  - {{name: r, match: p199, tuner: lora}}\n",
    )
    _refused(path, r"patterns\.p\d+: patterns refer to each other more than 32 deep", limits.PATTERN_REFERENCE_DEPTH)


@pytest.mark.parametrize(
    "nested",
    [
        "{not: " * 3000 + "{kind: linear}" + "}" * 3000,
        "{any_of: [" * 3000 + "{kind: linear}" + "]}" * 3000,
        "{not: {any_of: [" * 1500 + "{}" + "]}}" * 1500,
    ],
    ids=["not", "any_of", "both"],
)
def test_deep_predicates(tmp_path, counted, nested):
    path = _write(
        tmp_path, f"version: 1\npatterns:\n  p: {{node: {nested}}}\nrules:\n  - {{name: r, match: p, tuner: lora}}\n"
    )
    _refused(
        path, r"bad\.yaml:3:\d+: patterns\.p\.node\.(not|any_of).*: nested more than 32 levels", limits.RULE_NESTING
    )
    assert counted["composed"] < 1000  # stopped at the limit, long before the 3000th level


def test_deep_lists_and_block_mappings(tmp_path):
    _refused(_write(tmp_path, "version: 1\nrules: " + "[" * 3000 + "]" * 3000 + "\n"), r"nested more than 32 levels")
    block = "".join("  " * i + f"k{i}:\n" for i in range(200))
    _refused(
        _write(tmp_path, "version: 1\ndescription:\n" + textwrap.indent(block, "  ")), r"nested more than 32 levels"
    )


def test_a_raised_nesting_limit_still_ends_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(limits.RULE_NESTING.env, "100000")  # past Python's recursion: the last resort answers
    path = _write(tmp_path, "version: 1\nrules: " + "[" * 5000 + "]" * 5000 + "\n")
    _refused(path, r"bad\.yaml:1:1: \(top level\): too deeply nested or too large to load \(RecursionError\)")


@pytest.mark.parametrize(
    "value,message",
    [
        ("9" * 5000, r"a value of 5,000 characters; the limit is 4,096 characters"),
        ("9" * 4000, r"an integer of 4,000 digits; the limit is 18 digits"),
        ("0x" + "f" * 17, r"an integer of \d+ digits; the limit is 18 digits"),
        ("1:0:0:0:0:0:0:0:0:0:0:0", r"an integer of \d+ digits; the limit is 18 digits"),
    ],
    ids=["5000-digits", "4000-digits", "hex", "base-60"],
)
def test_huge_integers(tmp_path, value, message):
    path = _write(tmp_path, f"version: 1\nrules:\n  - {{name: r, match: attention, tuner: lora, first: {value}}}\n")
    _refused(path, r"bad\.yaml:3:53: rules\[0\]\.first: " + message)


def test_long_names_strings_keys_and_globs(tmp_path):
    rule = "version: 1\nrules:\n  - {{name: {name}, match: {match}, tuner: lora{extra}}}\n"
    long = "n" * 300
    cases = [
        (
            rule.format(name="n" * 100_000, match="attention", extra=""),
            r"rules\[0\]\.name: a value of 100,000 characters",
        ),
        (rule.format(name=long, match="attention", extra=""), r"rules\[0\]\.name: a rule name of 300 characters"),
        (rule.format(name="r", match=long, extra=""), r"rules\[0\]\.match: a pattern name of 300 characters"),
        (
            rule.format(name="r", match="attention", extra=f", scope: '{long}'"),
            r"rules\[0\]\.scope: a scope glob of 300",
        ),
        (rule.format(name="r", match="attention", extra=f", {long}: 1"), r"rules\[0\]: a key of 300 characters"),
        (
            rule.format(name="r", match=f"{{node: {{class: {long}}}}}", extra=""),
            r"rules\[0\]\.match\.node\.class: a class glob of 300",
        ),
        (rule.format(name="r", match=f"{{scope: {long}}}", extra=""), r"rules\[0\]\.match\.scope: a scope glob of 300"),
    ]
    for text, message in cases:
        _refused(_write(tmp_path, text), r"bad\.yaml:3:\d+: " + message)


def test_raising_a_limit_through_its_variable(tmp_path, monkeypatch):
    path = _write(tmp_path, f"version: 1\nrules:\n  - {{name: {'n' * 300}, match: attention, tuner: lora}}\n")
    _refused(path, r"a rule name of 300 characters", limits.RULE_NAME_LENGTH)
    monkeypatch.setenv(limits.RULE_NAME_LENGTH.env, "400")
    assert load_rules(path).rules[0].name == "n" * 300
    monkeypatch.setenv(limits.RULE_NAME_LENGTH.env, "lots")
    with pytest.raises(UtuneError, match=r"UTUNE_FX_RULE_NAME_LENGTH='lots': expected a positive integer"):
        load_rules(path)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"version: 1\x00\nrules: []\n", r"bad\.yaml:1:11: invalid YAML: character #x0000 is not allowed"),
        (b"version: 1\ndescription: caf\xe9\n", r"bad\.yaml:2:17: \(top level\): byte 0xe9 is not UTF-8 text"),
        (b'version: 1\ndescription: "\\ud800"\n', r"bad\.yaml:2:14: description: the text holds an unpaired surrogate"),
        (b"version: 1\ndescription: 2001-02-30\n", r"bad\.yaml:2:14: description: cannot read '2001-02-30'"),
    ],
    ids=["nul", "latin-1", "surrogate", "bad-date"],
)
def test_bytes_yaml_refuses(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    _refused(path, message)


def test_unreadable_paths(tmp_path):
    with pytest.raises(RuleError, match=r"not found") as caught:
        load_rules(str(tmp_path / "a\x00b.yaml"))
    assert "\n" not in str(caught.value)
    path = _write(tmp_path, 'version: 1\nimports: ["a\\x00b"]\nrules:\n  - {name: r, match: attention, tuner: lora}\n')
    _refused(path, r"bad\.yaml:2:11: imports\[0\]: an imported file name cannot hold a NUL character")


# -- rule names and tuner modules ------------------------------------------------------------


@pytest.mark.parametrize("second", ["a_b", "a.b", "a b", "a/b"])
def test_rule_names_that_share_tuner_modules_are_refused(tmp_path, second):
    path = _write(
        tmp_path,
        f"version: 1\nrules:\n  - {{name: a-b, match: attention, tuner: lora}}\n"
        f"  - {{name: '{second}', match: ffn, tuner: lora}}\n",
    )
    _refused(
        path,
        rf"bad\.yaml:4:12: rules\[1\]\.name: rules 'a-b' \(.*bad\.yaml:3:5\) and '{re.escape(second)}' "
        r"would share the tuner modules 'utune\.a_b\.\*'",
    )


# -- globs -----------------------------------------------------------------------------------


def _old_scope_regex(glob: str) -> re.Pattern:
    """The regular expression scope globs used to compile to (what they mean, by the old code)."""
    if glob == "**":
        return re.compile(r".*")
    regex = ""
    for i, segment in enumerate(glob.split(".")):
        if segment == "**":
            regex += r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
            continue
        if regex and not regex.endswith(r"\.)*"):
            regex += r"\."
        regex += "".join("[^.]*" if ch == "*" else "[^.]" if ch == "?" else re.escape(ch) for ch in segment)
    return re.compile(regex)


GLOBS = ["blocks.*.attn", "layers.**.mlp", "**.qkv", "**", "*", "blocks.?.a*n", "a.**", "**.b.**.c", "st*s.*.blo*s.*"]
PATHS = ["", "blocks.0.attn", "blocks.10.attn", "layers.0.1.mlp", "layers.mlp", "x.qkv", "qkv", "a", "a.b.c"]
PATHS += ["a.x.b.y.c", "b.c", "stages.1.blocks.2", "blocks.0.attn.qkv", "xlayers.0.mlp"]


@pytest.mark.parametrize("glob", GLOBS)
def test_scope_globs_mean_what_they_meant(glob):
    old = _old_scope_regex(glob)
    assert [ScopeGlob(glob).fullmatch(p) for p in PATHS] == [bool(old.fullmatch(p)) for p in PATHS]


def test_class_globs():
    assert ClassGlob("timm.*.Block").fullmatch("timm.models.vision_transformer.Block")
    assert ClassGlob("Attention").fullmatch("Attention") and not ClassGlob("Attention").fullmatch("Attention2")
    assert ClassGlob("*Attention*").fullmatch("WindowAttentionV2") and not ClassGlob("?lock").fullmatch("Block")


def test_wildcards_cannot_backtrack_exponentially(monkeypatch):
    """A glob of 30 stars then 'b' fails against 60 'a's after at most (glob x text) comparisons
    (a backtracking regex takes ~C(60, 30) steps: it never finishes)."""
    comparisons = []
    wildcard = glob_module._wildcard

    def counting(pattern, text, is_star, fits):
        return wildcard(pattern, text, is_star, lambda p, t: comparisons.append(1) or fits(p, t))

    monkeypatch.setattr(glob_module, "_wildcard", counting)
    stars = "*?" * 15 + "b"  # '?' keeps the stars apart, so collapsing runs of '*' alone would not help
    assert not ScopeGlob(stars).fullmatch("a" * 60) and not ClassGlob("*" * 30 + "b").fullmatch("a" * 60)
    assert ScopeGlob(stars).fullmatch("a" * 60 + "b") and ClassGlob("*" * 30 + "b").fullmatch("a" * 60 + "b")
    assert len(comparisons) <= 4 * len(stars) * 62


class Stack(nn.Module):
    """Ten linears in a chain, in blocks.N.attn scopes."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(4, 4)}) for _ in range(10))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block["attn"](x))
        return x


@pytest.fixture(scope="module")
def stack():
    return trace(Stack().eval(), torch.randn(2, 4))


@pytest.mark.parametrize(
    "pattern,matches",
    [
        ("{node: {scope: '%s'}}" % ("*" * 30 + "b"), 0),
        ("{node: {inside: '%s'}}" % ("*" * 30 + "b"), 0),
        ("{node: {class: '%s'}}" % ("*" * 30 + "b"), 0),
        ("{scope: '%s'}" % ("*" * 30 + "b"), 0),
        ("{node: {kind: linear, scope: 'blocks.*.%sattn'}}" % ("*" * 30), 10),
        ("{node: {kind: linear, class: '%sLinear'}}" % ("*" * 30), 10),
        ("{node: {kind: linear, inside: '%sblocks.**'}}" % ("*" * 30), 10),
    ],
)
def test_star_globs_in_rules_fail_fast_and_still_match(tmp_path, stack, pattern, matches):
    path = _write(tmp_path, f"version: 1\npatterns:\n  p: {pattern}\nrules:\n  - {{name: r, match: p, tuner: lora}}\n")
    assert len(match_rules(stack, load_rules(path))[0].regions) == matches


# -- graph-pattern search budget -------------------------------------------------------------


def _chain_pattern(n: int) -> str:
    names = [f"n{i}" for i in range(n)]
    nodes = ", ".join(f"{name}: {{}}" for name in names)
    edges = ", ".join(f"'{a} ->* {b}'" for a, b in zip(names, names[1:]))
    return f"version: 1\npatterns:\n  chain:\n    graph:\n      nodes: {{{nodes}}}\n      edges: [{edges}]\n"


def test_graph_search_over_its_budget_names_the_pattern_and_the_budget(tmp_path, stack, monkeypatch):
    monkeypatch.setenv(limits.GRAPH_SEARCH_STEPS.env, "2000")
    path = _write(tmp_path, _chain_pattern(9) + "rules:\n  - {name: r, match: chain, tuner: lora}\n")
    rules = load_rules(path)
    with pytest.raises(RuleError) as caught:
        match_rules(stack, rules)
    text = str(caught.value)
    assert re.match(
        r"^\S*bad\.yaml:4:5: patterns\.chain: the graph search around node \S+ \(.*\) took more than "
        r"2,000 steps; the limit is 2,000 steps; .* set UTUNE_FX_GRAPH_SEARCH_STEPS above 2000",
        text,
    ), text


def test_shipped_graph_patterns_stay_far_below_the_budget(monkeypatch):
    from toy_models import transformer_encoder

    monkeypatch.setenv(limits.GRAPH_SEARCH_STEPS.env, str(limits.GRAPH_SEARCH_STEPS.default // 20))
    gm = trace(transformer_encoder(layers=2).eval(), torch.randn(2, 5, 32))
    found = match_rules(gm, load_rules(Path(__file__).resolve().parents[1] / "rules" / "dual_utuner.yaml"))
    assert [len(m.regions) for m in found][:2] == [2, 2]  # attention and FFN of both layers


def test_graph_patterns_have_at_most_so_many_nodes(tmp_path):
    path = _write(tmp_path, _chain_pattern(30) + "rules:\n  - {name: r, match: chain, tuner: lora}\n")
    _refused(path, r"bad\.yaml:5:14: patterns\.chain\.graph\.nodes: 30 nodes, more than 24", limits.GRAPH_PATTERN_NODES)


# -- tuner settings --------------------------------------------------------------------------


def _settings(kind: str) -> list[tuple[str, str]]:
    """(tuner, setting) for every registered tuner's settings of a kind: 'number' or 'size'."""
    found = []
    for name, entry in TUNERS.items():
        for setting in dataclasses.fields(entry.config):
            words = set(re.findall(r"\w+", str(setting.type)))
            size = "int" in words and "float" not in words
            if (kind == "size") == size and (size or "float" in words):
                found.append((name, setting.name))
    return found


@pytest.mark.parametrize("tuner,setting", _settings("number"), ids="-".join)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_no_tuner_takes_nan_or_infinity(tuner, setting, value):
    with pytest.raises(ValueError, match=rf"^{setting} must be a finite number, got {value}"):
        create_config(tuner, {setting: value})


@pytest.mark.parametrize("tuner,setting", _settings("size"), ids="-".join)
def test_no_tuner_takes_absurd_sizes(tuner, setting):
    with pytest.raises(
        ValueError, match=rf"^{setting} is 1,000,000,000,000, too large for any tuner; the limit is 65,536"
    ):
        create_config(tuner, {setting: 10**12})
    assert create_config(tuner, {setting: 65_536})


def test_the_kinds_of_settings_cover_the_probe():
    assert {("lora", "alpha"), ("parallel_adapter", "scale"), ("lora", "dropout")} <= set(_settings("number"))
    assert {
        ("lora", "rank"),
        ("parallel_adapter", "hidden"),
        ("prefix", "length"),
        ("prompt", "length"),
        ("head", "num_classes"),
    } <= set(_settings("size"))


def test_a_newly_registered_tuner_gets_the_checks():
    @register_tuner("test_hardening_dummy", positions=("parallel",))
    @dataclasses.dataclass
    class DummyConfig(TunerConfig):
        gain: float = 1.0
        width: int = 4

        def __post_init__(self) -> None:  # its own checks replace the base's: the registry keeps both
            if self.width < 1:
                raise ValueError("width must be positive")

        def added_parameters(self, size) -> int:
            return 0

    try:
        with pytest.raises(ValueError, match="gain must be a finite number"):
            create_config("test_hardening_dummy", {"gain": math.nan})
        with pytest.raises(ValueError, match="width is 100,000, too large"):
            create_config("test_hardening_dummy", {"width": 100_000})
        with pytest.raises(ValueError, match="width must be positive"):
            create_config("test_hardening_dummy", {"width": 0})
    finally:
        del TUNERS["test_hardening_dummy"]


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            "{tuner: lora, settings: {alpha: .inf}}",
            r"settings\.alpha: alpha must be a finite number, got inf",
        ),
        (
            "{tuner: parallel_adapter, settings: {scale: .nan}}",
            r"settings\.scale: scale must be a finite number, got nan",
        ),
        ("{tuner: lora, settings: {alpha: 1.0e+300}}", r"settings\.alpha: alpha is 1e\+300, too large in magnitude"),
        (
            "{tuner: parallel_adapter, settings: {hidden: 1000000000000}}",
            r"settings\.hidden: hidden is 1,000,000,000,000",
        ),
        ("{tuner: lora, settings: {rank: 1000000000}}", r"settings\.rank: rank is 1,000,000,000, too large"),
        ("{tuner: prefix, settings: {length: 100000000}}", r"settings\.length: length is 100,000,000, too large"),
        (
            "{tuner: head, settings: {num_classes: 1000000000000}}",
            r"settings\.num_classes: num_classes is 1,000,000,000,000",
        ),
    ],
)
def test_insane_settings_in_rule_files(tmp_path, settings, message):
    rule = "{name: r, match: attention, " + settings[1:]
    _refused(_write(tmp_path, f"version: 1\nrules:\n  - {rule}\n"), r"bad\.yaml:3:\d+: rules\[0\]\." + message)
