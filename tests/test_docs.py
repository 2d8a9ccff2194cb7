"""The docs name what the code has."""

from pathlib import Path

from utune_fx.trace import OP_KINDS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_op_kind_is_documented():
    text = (DOCS / "opkinds.md").read_text()
    missing = [kind for kind in OP_KINDS if f"| `{kind}` |" not in text]
    assert missing == []


def test_rules_reference_names_every_key_pattern_and_tuner():
    from utune_fx.match import load_prelude
    from utune_fx.match.predicates import PREDICATE_KEYS
    from utune_fx.match.rules import RULE_KEYS, TOP_KEYS
    from utune_fx.tuners import TUNERS

    text = (DOCS / "rules.md").read_text()
    names = [*TOP_KEYS, *RULE_KEYS, *PREDICATE_KEYS, *load_prelude(), *TUNERS]
    names += [field for entry in TUNERS.values() for field in entry.fields()]
    assert [name for name in names if f"`{name}`" not in text] == []


def test_deploy_doc_says_how_every_tuner_folds():
    from utune_fx.tuners import TUNERS

    text = (DOCS / "deploy.md").read_text()
    assert [name for name in TUNERS if f"`{name}`" not in text] == []
