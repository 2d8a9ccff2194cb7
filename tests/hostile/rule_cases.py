"""Hostile rule files (issue 15, categories 2-4): alias bombs, globs, graph searches, huge files and
names, NUL bytes, giant integers, deep nesting, imports of special files, and settings that are
valid in type but absurd in value. Each runs ``match`` or ``rewrite`` of the tiny model on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hostile import files
from hostile.case import Case, argv_of, rules_file, through_cli
from hostile.files import rule, rule_file
from hostile.workspace import SPEC, Workspace

# -- 2. hangs and memory blow-ups from rule files ---------------------------------------------------
LAUGH = files.laughs(9, 9)


def _imported_laughs(folder: Path, space: Workspace) -> list[str]:
    rules_file(folder, "version: 1\npatterns:\n  p: {node: {kind: linear}, description: " + LAUGH + "}\n", "lib.yaml")
    return ["match", SPEC, "--rules", rules_file(folder, rule_file(head="imports: [lib.yaml]\n"))]


def _dev_zero(folder: Path, space: Workspace) -> list[str]:
    return ["match", SPEC, "--rules", "/dev/zero"]


def _many_rules(folder: Path, space: Workspace) -> list[str]:
    return ["match", SPEC, "--rules", rules_file(folder, files.many_rules(120_000))]


def _glob(where: str) -> str:
    glob = files.stars(25)
    return {
        "scope": rule_file(rule(extra=f"scope: {glob}")),
        "class": rule_file(rule(match=f"{{node: {{class: {glob}}}}}", tuner="lora", settings=None)),
        "inside": rule_file(rule(match=f"{{node: {{inside: {glob}}}}}", tuner="lora", settings=None)),
        "node scope": rule_file(rule(match=f"{{node: {{scope: {glob}}}}}", tuner="lora", settings=None)),
        "scope form": rule_file(rule(match=f"{{scope: {glob}}}")),
    }[where]


HANGS = [
    Case(2, "aliases: 9 levels of 9 in rules:", through_cli(f"version: 1\nrules: {LAUGH}\n"), must_fail=True,
         bounded=True),
    Case(2, "aliases: in description", through_cli(rule_file(head=f"description: {LAUGH}\n")), must_fail=True,
         bounded=True),
    Case(2, "aliases: under settings", through_cli(rule_file(rule(settings=files.laughs(9, 9, mapping=True)))),
         must_fail=True, bounded=True),
    Case(2, "aliases: mappings only", through_cli(rule_file(head=f"patterns: {files.laughs(9, 9, mapping=True)}\n")),
         must_fail=True, bounded=True),
    Case(2, "aliases: in an imported pattern file", _imported_laughs, must_fail=True, bounded=True),
    *[Case(2, f"glob of 25 stars then b in {where}", through_cli(_glob(where)), bounded=True)
      for where in ("scope", "class", "inside", "node scope", "scope form")],
    Case(2, "graph pattern of 9 unconstrained nodes ->*", through_cli(rule_file(rule(match=files.graph_of(9)))),
         bounded=True),
    Case(2, "120,000 rules (10 MB)", _many_rules, must_fail=True, bounded=True),
    Case(2, "a 100,000-character rule name", through_cli(rule_file(rule(name="n" * 100_000))), must_fail=True,
         bounded=True),
    Case(2, "--rules /dev/zero", _dev_zero, must_fail=True, bounded=True),
]  # fmt: skip


def _deep_predicate(form: str) -> str:
    return rule_file(rule(match=f"{{node: {files.deep(form, 3000)}}}", tuner="lora", settings=None))


def _imports(*imported: str) -> Callable[[Path, Workspace], list[str]]:
    """A rule file importing ``imported`` (paths; 'a.yaml' <-> 'b.yaml' import each other)."""

    def build(folder: Path, space: Workspace) -> list[str]:
        rules_file(folder, "version: 1\nimports: [b.yaml]\npatterns:\n  pa: {node: {kind: linear}}\n", "a.yaml")
        rules_file(folder, "version: 1\nimports: [a.yaml]\npatterns:\n  pb: {node: {kind: conv}}\n", "b.yaml")
        head = "imports: [" + ", ".join(imported) + "]\n"
        return ["match", SPEC, "--rules", rules_file(folder, rule_file(head=head))]

    return build


RULE_TRACEBACKS = [
    Case(3, "rule file with a NUL byte", through_cli(rule_file().replace("name: r", "name: r\0x")), must_fail=True),
    Case(3, "a 5,000-digit integer", through_cli(rule_file(rule(settings="{hidden: " + "9" * 5000 + "}"))),
         must_fail=True),
    Case(3, "3,000 levels of not", through_cli(_deep_predicate("not")), must_fail=True),
    Case(3, "3,000 levels of any_of", through_cli(_deep_predicate("any_of")), must_fail=True),
    Case(3, "3,000 levels of nested patterns", through_cli(rule_file(rule(match=files.deep_pattern(3000)))),
         must_fail=True),
    Case(3, "hidden 2**62 at rewrite", through_cli(rule_file(rule(settings=f"{{hidden: {2**62}}}")), "rewrite"),
         must_fail=True),
    Case(3, "a parallel adapter on every node", through_cli(rule_file(rule(match="{node: {}}")), "rewrite")),
    Case(3, "an alias-expanded mapping as a setting's value (echoed?)",
         through_cli(rule_file(rule(settings="{dropout: " + files.laughs(6, 2, mapping=True) + "}"))), must_fail=True),
    Case(3, "rule file imports /dev/zero", _imports("/dev/zero"), must_fail=True, bounded=True),
    Case(3, "rule files that import each other", _imports("a.yaml"), bounded=True),  # a cycle may load once
    Case(3, "rule file imports /etc/passwd", _imports("/etc/passwd"), must_fail=True),
    Case(3, "--rules names a directory", argv_of("match", SPEC, "--rules", "{dir}"), must_fail=True),
]  # fmt: skip


# -- 4. wrong successes -----------------------------------------------------------------------------
def _both(name: str, text: str, **promise) -> list[Case]:
    """The same rule file through match (the dry run) and rewrite: both must agree."""
    return [Case(4, f"{name} ({command})", through_cli(text, command), **promise) for command in ("match", "rewrite")]


WRONG = [
    *_both("lora alpha .inf", rule_file(rule(match="linear", tuner="lora", settings="{alpha: .inf}")),
           must_fail=True),
    *_both("adapter scale .nan", rule_file(rule(settings="{scale: .nan}")), must_fail=True),
    *_both("adapter hidden 10**12", rule_file(rule(settings=f"{{hidden: {10**12}}}")), must_fail=True),
    *_both("lora rank 10**9", rule_file(rule(match="linear", tuner="lora", settings=f"{{rank: {10**9}}}")),
           must_fail=True),
    *_both("prefix length 10**8", rule_file(rule(tuner="prefix", settings=f"{{length: {10**8}}}")),
           must_fail=True),
    *_both("head num_classes 10**12",
           rule_file(rule(match="head", tuner="head", settings=f"{{num_classes: {10**12}}}")),
           must_fail=True),
    *_both("rules named a-b and a_b", rule_file(rule("a-b"), rule("a_b", match="ffn")),
           must_fail=True),
    *_both("a rule that matches nothing",
           rule_file(rule(match="{node: {kind: linear, scope: nowhere}}", tuner="lora", settings=None)),
           must_fail=True, exit_code=3),
    *_both("lora on an attention region", rule_file(rule(match="attention", tuner="lora", settings=None)),
           must_fail=True),
]  # fmt: skip
