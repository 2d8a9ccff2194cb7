"""The docs name what the code has."""

from pathlib import Path

from utune_fx.trace import OP_KINDS

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_op_kind_is_documented():
    text = (DOCS / "opkinds.md").read_text()
    missing = [kind for kind in OP_KINDS if f"| `{kind}` |" not in text]
    assert missing == []
