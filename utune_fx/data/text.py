"""Text behind the ``--data`` specs of sequence classification and causal language modelling.

    jsonl:PATH?text=FIELD&label=FIELD     JSON Lines, one object a line: sequence classification
    csv:PATH?text=FIELD&label=FIELD       a CSV file whose first row names the columns: the same
    jsonl:PATH?text=FIELD                 no label=: causal language modelling on the texts
    csv:PATH?text=FIELD                   the same, from a CSV column
    text:PATH                             plain text, every non-blank line one example: causal LM

Labels are strings or integers; each distinct label is a class, the classes sorted (numerically when
every label is an integer, else as strings) and numbered 0, 1, ... in that order. Files are read as
data only (json.loads, the csv module; nothing evaluated or unpickled), within the bounds below, and
every problem is one line naming the file, the line and the fix. Tokenising is data/text_splits.py.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np

from utune_fx.errors import UtuneError, first_line

TEXT_SCHEMES = ("jsonl:PATH?text=FIELD[&label=FIELD]", "csv:PATH?text=FIELD[&label=FIELD]", "text:PATH")
MAX_FILE_BYTES = 1 << 30  # 1 GiB: a text file read whole into memory
MAX_RECORD_BYTES = 1 << 20  # 1 MiB: one line of JSON Lines or text, one field of a CSV file
MAX_EXAMPLES = 1_000_000
MAX_CLASSES = 10_000
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass
class TextPool:
    """The examples of a text file: their texts, the lines they start on, their labels (0 for a causal LM)."""

    path: Path
    texts: list[str]
    lines: list[int]
    labels: np.ndarray
    encoded = False  # nothing to verify before use (images: ImagePool.encoded)

    def __len__(self) -> int:
        return len(self.texts)

    def describe(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}"

    def identity(self, index: int) -> str:
        """Line number and text: what a recorded split's sha256 covers, wherever the file lies."""
        return f"{self.lines[index]}:{self.texts[index]}"


@dataclass
class TextSource:
    pool: TextPool
    classes: list[str]  # [] for causal language modelling
    task: str  # "classification" or "causal-lm"


def is_text_spec(spec: str) -> bool:
    return spec.partition("?")[0].partition(":")[0] in ("jsonl", "csv", "text")


def _options(spec: str, scheme: str) -> dict[str, str]:
    options = dict(parse_qsl(spec.partition("?")[2], keep_blank_values=True))
    allowed = () if scheme == "text" else ("text", "label")
    if unknown := sorted(set(options) - set(allowed)):
        offered = "text:PATH takes none" if scheme == "text" else "text=FIELD (required), label=FIELD"
        raise UtuneError(f"unknown option {unknown[0]!r} in data spec {spec!r}; options: {offered}")
    if scheme != "text" and not options.get("text"):
        raise UtuneError(
            f"data spec {spec!r} names no text field; add ?text=FIELD (and &label=FIELD for classification)"
        )
    if "label" in options and not options["label"]:
        raise UtuneError(f"data spec {spec!r} has an empty label=; name the label field, or leave label= out")
    return options


def _checked_file(spec: str, location: str) -> Path:
    """The file a spec names: a regular file (a FIFO would block, a device never ends) within the size bound."""
    path = Path(location).expanduser()
    where = f"data path {path} (from --data {spec})"
    try:
        info = path.stat()
    except OSError as error:
        missing = isinstance(error, FileNotFoundError)
        raise UtuneError(
            f"{where} " + ("does not exist; check the path" if missing else f"cannot be read ({first_line(error)})")
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise UtuneError(f"{where} is not a regular file; give a .jsonl, .csv or .txt file")
    if info.st_size > MAX_FILE_BYTES:
        raise UtuneError(
            f"{path} is {info.st_size / 2**20:,.0f} MiB, over the limit of {MAX_FILE_BYTES >> 20:,} MiB "
            "for a text file; split it or sample it"
        )
    return path


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded as UTF-8, no line over MAX_RECORD_BYTES."""
    with open(path, "rb") as handle:
        for number in itertools.count(1):
            raw = handle.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_RECORD_BYTES:
                raise UtuneError(
                    f"{path}:{number}: the line is longer than {MAX_RECORD_BYTES >> 20} MiB, the most one "
                    "record may hold; shorten or split it"
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UtuneError(
                    f"{path}:{number}: not UTF-8 ({error.reason} at byte {error.start}); save the file as UTF-8"
                ) from error


def _count(path: Path, examples: int) -> None:
    if examples > MAX_EXAMPLES:
        raise UtuneError(
            f"{path} holds more than {MAX_EXAMPLES:,} examples, the most a text source reads; split or sample it"
        )


def _label(value, path: Path, number: int, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UtuneError(
            f"{path}:{number}: label field {field!r} is {json.dumps(value)[:40]}; a label is a string or an integer"
        )
    return str(value)


def _text(value, path: Path, number: int, field: str) -> str:
    if not isinstance(value, str):
        raise UtuneError(
            f"{path}:{number}: text field {field!r} is {json.dumps(value)[:40]}, not a string; fix the line"
        )
    return value


def _missing(path: Path, number: int, field: str, present, option: str) -> UtuneError:
    names = ", ".join(repr(name) for name in list(present)[:10]) or "none"
    return UtuneError(
        f"{path}:{number}: no field {field!r} (the fields there: {names}); add it to the line, or name "
        f"another field with ?{option}=FIELD"
    )


def _read_jsonl(path: Path, text_field: str, label_field: str | None) -> tuple[list, list, list]:
    texts, labels, lines = [], [], []
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise UtuneError(
                f"{path}:{number}: not a JSON object ({first_line(error)}); one JSON object a line"
            ) from error
        if not isinstance(record, dict):
            raise UtuneError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; one JSON object a line")
        for field, option in ((text_field, "text"), (label_field, "label")):
            if field is not None and field not in record:
                raise _missing(path, number, field, record, option)
        texts.append(_text(record[text_field], path, number, text_field))
        if label_field is not None:
            labels.append(_label(record[label_field], path, number, label_field))
        lines.append(number)
        _count(path, len(texts))
    return texts, labels, lines


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    previous = csv.field_size_limit(limit)  # process-wide: restored after reading
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv(path: Path, text_field: str, label_field: str | None) -> tuple[list, list, list]:
    texts, labels, lines = [], [], []
    with _csv_field_limit(MAX_RECORD_BYTES), contextlib.closing(_lines(path)) as numbered:
        reader = csv.reader(line for _, line in numbered)
        try:
            header = next(reader, None)
            if header is None:
                raise UtuneError(f"{path} is empty; its first row names the columns, e.g. text,label")
            for field, option in ((text_field, "text"), (label_field, "label")):
                if field is not None and field not in header:
                    raise _missing(path, 1, field, header, option)
            text_at = header.index(text_field)
            label_at = header.index(label_field) if label_field is not None else None
            for row in reader:
                number = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise UtuneError(
                        f"{path}:{number}: {len(row)} fields, the header names {len(header)}; quote fields "
                        'that hold commas ("a, b")'
                    )
                texts.append(row[text_at])
                if label_at is not None:
                    labels.append(row[label_at])
                lines.append(number)
                _count(path, len(texts))
        except csv.Error as error:
            raise UtuneError(
                f"{path}:{reader.line_num}: not CSV ({error}; a field may hold at most {MAX_RECORD_BYTES >> 20} MiB)"
            ) from error
    return texts, labels, lines


def _read_plain(path: Path) -> tuple[list, list, list]:
    texts, lines = [], []
    for number, line in _lines(path):
        if line.strip():
            texts.append(line.rstrip("\r\n"))
            lines.append(number)
            _count(path, len(texts))
    return texts, [], lines


def _classes(names: list[str], path: Path, field: str) -> tuple[list[str], np.ndarray]:
    """Distinct labels, sorted (as integers when all are), and each example's index among them."""
    distinct = set(names)
    if len(distinct) < 2:
        raise UtuneError(
            f"{path}: every example has label {next(iter(distinct))!r} in field {field!r}; a classifier needs "
            "two classes or more (leave label= out to train a causal language model on the texts)"
        )
    if len(distinct) > MAX_CLASSES:
        raise UtuneError(
            f"{path}: {len(distinct):,} distinct labels in field {field!r}, over the limit of {MAX_CLASSES:,} "
            "classes; is label= the right field?"
        )
    numeric = all(_INTEGER.fullmatch(name.strip()) for name in distinct)
    classes = sorted(distinct, key=(lambda name: (int(name), name)) if numeric else None)
    index = {name: position for position, name in enumerate(classes)}
    return classes, np.asarray([index[name] for name in names], dtype=np.int64)


def read_text_source(spec: str) -> TextSource:
    """Parse a text ``--data`` spec and read its file (see the module docstring)."""
    body = spec.partition("?")[0]
    scheme, _, location = body.partition(":")
    options = _options(spec, scheme)
    if not location:
        raise UtuneError(f"data spec {spec!r} names no file; use one of {', '.join(TEXT_SCHEMES)}")
    path = _checked_file(spec, location)
    label_field = options.get("label")
    if scheme == "text":
        texts, labels, lines = _read_plain(path)
    else:
        reader = _read_jsonl if scheme == "jsonl" else _read_csv
        texts, labels, lines = reader(path, options["text"], label_field)
    if not texts:
        raise UtuneError(f"{path} holds no examples; add {'lines of text' if scheme == 'text' else 'records'}")
    if label_field is None:
        return TextSource(TextPool(path, texts, lines, np.zeros(len(texts), dtype=np.int64)), [], "causal-lm")
    classes, indices = _classes(labels, path, label_field)
    return TextSource(TextPool(path, texts, lines, indices), classes, "classification")
