"""What a rule file may cost: every bound on reading, compiling and matching rules, in one place.

    RULE_FILE_BYTES.value()  -> 262144 (or UTUNE_FX_RULE_FILE_BYTES, when set)
    RULE_FILE_BYTES.refuse(where, "the file has more")  -> one located RuleError line

Rule files are data that anyone may hand in, so each cost that grows with
what they say is bounded: bytes read, values after YAML alias expansion,
nesting, integer digits, string and name lengths, rules, patterns, imported
files, chains of pattern references, nodes of a graph pattern and the steps
of its search. The defaults sit far above what real rule files use (the
prelude: 4 KB, ~600 values, nesting 8) and far below what makes a load slow
or large. A user who needs more sets the limit's environment variable; the
refusal names it. docs/limits.md lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from utune_fx.errors import UtuneError


@dataclass(frozen=True)
class Limit:
    name: str  # names the environment variable: UTUNE_FX_<NAME>
    default: int
    unit: str  # what is counted ("bytes", "values")
    hint: str  # what to do instead of raising it

    @property
    def env(self) -> str:
        return "UTUNE_FX_" + self.name.upper()

    def value(self) -> int:
        """The limit in force: the environment variable when it is set, else the default."""
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default
        if not text.isdigit() or not 0 < int(text) <= 10**12:
            raise UtuneError(f"{self.env}={text[:40]!r}: expected a positive integer (the default is {self.default})")
        return int(text)

    def advice(self) -> str:
        """'the limit is N; HINT, or set ENV above N': the tail of every refusal."""
        limit = self.value()
        return f"the limit is {limit:,} {self.unit}; {self.hint}, or set {self.env} above {limit} to raise it"


RULE_FILE_BYTES = Limit("rule_file_bytes", 256 * 1024, "bytes", "split the file and import the parts")
# YAML values of one file after alias expansion (a 'billion laughs' blows up here)
RULE_VALUES = Limit(
    "rule_values", 20_000, "values", "write the values out without YAML aliases (&a / *a), or split the file"
)
RULE_NESTING = Limit("rule_nesting", 32, "levels", "flatten it: name inner patterns and refer to them")
RULE_INTEGER_DIGITS = Limit("rule_integer_digits", 18, "digits", "use a smaller number")
RULE_STRING_LENGTH = Limit("rule_string_length", 4096, "characters", "shorten the text")
# keys, rule and pattern names, pattern references, imported file names, globs
RULE_NAME_LENGTH = Limit("rule_name_length", 200, "characters", "use a shorter name")
RULES_PER_FILE = Limit("rules_per_file", 1000, "rules", "select more regions per rule (scope, layers) instead")
RULE_PATTERNS = Limit("rule_patterns", 1000, "patterns", "reuse patterns instead of repeating them")  # prelude's too
RULE_FILES = Limit("rule_files", 32, "files", "import fewer files")  # the rule file and its imports
# chains of named references (a -> b -> c ...), each one more level of recursion when compiling and matching
PATTERN_REFERENCE_DEPTH = Limit("pattern_reference_depth", 32, "references", "refer to patterns more directly")
GRAPH_PATTERN_NODES = Limit("graph_pattern_nodes", 24, "nodes", "split the pattern into smaller ones")
# candidate (graph node, pattern node) pairs the subgraph search tries around one anchor node; the shipped
# patterns need at most ~400 on the models of tests/test_patterns.py, ViT-B and Swin-T
GRAPH_SEARCH_STEPS = Limit(
    "graph_search_steps",
    50_000,
    "steps",
    "constrain the pattern's nodes (kind, scope, through) or use fewer '->*' chains",
)

# Tuner settings, checked when a config is made (utune_fx.tuners.check_settings), whatever the tuner
TUNER_SIZE = Limit(
    "tuner_size", 65_536, "for a rank, width, length or class count", "use a smaller value"
)  # rank, hidden, length, reparam_hidden, num_classes: far above what a parameter-efficient tuner uses
TUNER_NUMBER = Limit(
    "tuner_number", 1_000_000, "in magnitude for alpha, scale and other numbers", "use a smaller value"
)  # alpha, scale: an output scaled by 1e300 is inf (NaN and inf themselves are always refused)

ALL = (
    RULE_FILE_BYTES,
    RULE_VALUES,
    RULE_NESTING,
    RULE_INTEGER_DIGITS,
    RULE_STRING_LENGTH,
    RULE_NAME_LENGTH,
    RULES_PER_FILE,
    RULE_PATTERNS,
    RULE_FILES,
    PATTERN_REFERENCE_DEPTH,
    GRAPH_PATTERN_NODES,
    GRAPH_SEARCH_STEPS,
    TUNER_SIZE,
    TUNER_NUMBER,
)
