"""JSON files that utune_fx reads, checked against a JSON Schema before any field is used.

    read_json(path, "manifest")          file -> bounded parse -> jsonschema -> the data
    check_json(data, "manifest", where)  data already in memory (a string, a JSON line) -> the data

Each schema lives beside this file as ``<name>.schema.json`` (Draft 2020-12). A
file that is too large, not JSON, nested too deep, or off its schema is one
:class:`UtuneError` line: ``path: field.sub: what is wrong; fix``. Nothing in
a file is ever imported, evaluated or unpickled; the schemas bound sizes and
kinds so that later code can trust what it reads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

from utune_fx.errors import UtuneError, first_line

MAX_JSON_BYTES = 64 * 2**20  # the largest JSON file utune_fx reads (a manifest holds rule texts: kilobytes)
MAX_JSON_DEPTH = 64  # nesting levels; utune_fx's own files use fewer than 10
_HERE = Path(__file__).parent


@functools.cache
def _validator(schema: str) -> jsonschema.protocols.Validator:
    document = json.loads((_HERE / f"{schema}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(document)
    cls.check_schema(document)
    return cls(document)


def _depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings (before json.loads, which recurses)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _field(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    return path or "(top level)"


def parse_json(text: str, schema: str, where: str, fix: str = "") -> Any:
    """``text`` parsed and checked against ``schema``; ``where`` names the file in messages."""
    suffix = f"; {fix}" if fix else ""
    if len(text) > MAX_JSON_BYTES:
        raise UtuneError(
            f"{where}: {len(text):,} bytes is over the limit of {MAX_JSON_BYTES:,} for a {schema} file{suffix}"
        )
    if _depth(text) > MAX_JSON_DEPTH:
        raise UtuneError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels; not a {schema} file{suffix}")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as error:
        raise UtuneError(f"{where}: not valid JSON ({first_line(error)}){suffix}") from error
    return check_json(data, schema, where, fix)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def check_json(data: Any, schema: str, where: str, fix: str = "") -> Any:
    """``data`` when it fits ``schema``; else one line naming the first wrong field (the most relevant one)."""
    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(data))
    if error is not None:
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        raise UtuneError(f"{where}: {_field(error)}: {message}" + (f"; {fix}" if fix else ""))
    return data


def read_json(path: str | Path, schema: str, fix: str = "") -> Any:
    """The JSON file at ``path``, size-bounded, parsed and checked against ``schema``."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UtuneError(
                f"{path}: {path.stat().st_size:,} bytes is over the limit of {MAX_JSON_BYTES:,} for a "
                f"{schema} file" + (f"; {fix}" if fix else "")
            )
        with path.open("rb") as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)  # /dev/zero and friends report size 0
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise UtuneError(f"{path} is missing" + (f"; {fix}" if fix else "")) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UtuneError(f"{path}: cannot read ({first_line(error)})" + (f"; {fix}" if fix else "")) from error
    return parse_json(text, schema, str(path), fix)
