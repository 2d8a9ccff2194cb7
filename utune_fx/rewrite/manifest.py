"""manifest.json of a tuned artifact: written sealed, read back as bounded, checked data.

    write_manifest(DIR, manifest)   adds manifest_sha256 (sha256 of the canonical JSON without that
                                    field) and writes DIR/manifest.json through a temporary name
    read_manifest(DIR)              the manifest, or one line: missing, too large, nested too deep,
                                    not JSON, NaN, not UTF-8 (utune_fx/schemas), off
                                    manifest.schema.json (naming the field), rule source names
                                    that leave the artifact or clash, a rule text or the manifest
                                    itself not matching its sha256
    base_model_spec(manifest, ...)  the spec that rebuilds the base model; a spec that runs code
                                    only when the caller named it (--model SPEC, model=...)

manifest_sha256 catches damage and hand edits; it is not a signature (whoever can
write the file can recompute it). What keeps an artifact from running code is
base_model_spec: nothing recorded in it is imported or called unless the user
names it on the command line or passes the model in Python.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

from utune_fx.atomic import write_text
from utune_fx.errors import UtuneError
from utune_fx.schemas import check_json, read_json

FORMAT = "utune_fx.tuned/1"
MANIFEST = "manifest.json"
SELF_HASH = "manifest_sha256"
DAMAGED = "the artifact is damaged or was edited; write it again with cli.py rewrite (or train)"
UNWRITABLE = (
    "an artifact holds the rule file and what it imports from its folder and below, within the sizes in "
    "docs/limits.md; move the imported files"
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces, ASCII) without its own hash."""
    body = {key: value for key, value in manifest.items() if key != SELF_HASH}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return _sha256(canonical.encode())


def check_source_names(names: list[str], where: str, fix: str) -> None:
    """Rule source names are distinct plain relative paths, so writing them under one folder cannot
    leave it, overwrite one with another, or need a file and a folder of the same name."""
    keys: dict[tuple[str, ...], str] = {}
    for name in names:
        parts = tuple(name.split("/"))
        if (
            any(char < " " or char == "\\" or "\ud800" <= char <= "\udfff" for char in name)
            or any(part in ("", ".", "..") for part in parts)
            or ":" in parts[0]
        ):
            raise UtuneError(
                f"{where}: rule source name {name!r} is not a plain relative path below the rule file's folder "
                f"(no '..', '.', empty parts, leading '/', backslash, control characters or lone surrogates); {fix}"
            )
        key = tuple(part.casefold() for part in parts)  # A.yaml and a.yaml are one file on some file systems
        if key in keys:
            raise UtuneError(f"{where}: rule source names {keys[key]!r} and {name!r} name the same file; {fix}")
        keys[key] = name
    for key, name in keys.items():
        for end in range(1, len(key)):
            if key[:end] in keys:
                raise UtuneError(
                    f"{where}: rule source {keys[key[:end]]!r} is a file and also the folder of {name!r}; {fix}"
                )


def check_manifest(manifest: dict, where: str, fix: str = DAMAGED) -> dict:
    """The manifest when it fits its schema and its rule sources are sound (not its own hash)."""
    check_json(manifest, "manifest", where, fix)
    for index, entry in enumerate(manifest["rules"]):
        field = f"rules[{index}]"
        check_source_names(list(entry["sources"]), f"{where}: {field}.sources", fix)
        main = Path(entry["path"]).name
        if main not in entry["sources"]:
            raise UtuneError(f"{where}: {field}.path: its file {main!r} is not among the rule sources; {fix}")
        if set(entry["sha256"]) != set(entry["sources"]):
            raise UtuneError(f"{where}: {field}.sha256: names other files than {field}.sources; {fix}")
    return manifest


def write_manifest(directory: Path, manifest: dict, where: str | None = None) -> None:
    """Check the manifest as a reader will, seal it with its own sha256 and write it (``where``: the
    name for messages, when ``directory`` is a staging folder)."""
    path = Path(directory) / MANIFEST
    body = {key: value for key, value in manifest.items() if key != SELF_HASH}
    sealed = check_manifest(body | {SELF_HASH: manifest_sha256(body)}, where or str(path), UNWRITABLE)
    write_text(path, json.dumps(sealed, indent=1, allow_nan=False))


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise UtuneError(f"{directory}: no tuned artifact here; write one with cli.py rewrite ... -o {directory}")
    if not path.is_file():
        raise UtuneError(f"{path} is missing; the directory is not a complete tuned artifact")
    manifest = read_json(path, "format", DAMAGED)  # the format first: another kind of file gets its own line
    if manifest["format"] != FORMAT:
        raise UtuneError(f"{path}: not a utune_fx tuned artifact (format {manifest['format']!r}, expected {FORMAT!r})")
    check_manifest(manifest, str(path))
    for index, entry in enumerate(manifest["rules"]):
        for name, text in entry["sources"].items():
            try:
                encoded = text.encode()
            except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"); no file can hold it
                raise UtuneError(
                    f"{path}: rules[{index}].sources: {name} is not valid Unicode text; {DAMAGED}"
                ) from None
            if _sha256(encoded) != entry["sha256"][name]:
                raise UtuneError(f"{path}: rule text of {name} does not match its sha256; the manifest was edited")
    if SELF_HASH not in manifest:
        raise UtuneError(
            f"{path}: no {SELF_HASH}; the artifact was written by a utune_fx that did not seal its manifest, or "
            "the field was removed: write it again with cli.py rewrite (or train), or, having checked it, seal it "
            f"with python -c 'from utune_fx.rewrite.manifest import seal; seal({str(directory)!r})'"
        )
    if manifest[SELF_HASH] != manifest_sha256(manifest):
        raise UtuneError(f"{path}: the content does not match its {SELF_HASH}; {DAMAGED}")
    return manifest


def seal(directory: str | Path) -> None:
    """Add manifest_sha256 to a manifest written before manifests were sealed (after checking it yourself)."""
    path = Path(directory) / MANIFEST
    manifest = read_json(path, "format", DAMAGED)
    if manifest["format"] != FORMAT:
        raise UtuneError(f"{path}: not a utune_fx tuned artifact (format {manifest['format']!r}, expected {FORMAT!r})")
    write_manifest(Path(directory), check_manifest(manifest, str(path)))


def base_model_spec(manifest: dict, path: Path, model: Any = None) -> str:
    """The spec that rebuilds the base model: the caller's ``model`` (a spec string, which replaces the
    recorded one, or an nn.Module, for which the recorded spec only tells the input size) or the recorded
    spec when it is data (timm, card). A recorded spec that runs code is refused unless the caller named one."""
    from utune_fx.specs import CODE_SOURCES, check_data_options, parse_model_spec

    recorded = manifest["model"]
    try:
        spec = parse_model_spec(recorded)
        if model is not None:
            return model if isinstance(model, str) else recorded
        if spec.source in CODE_SOURCES:
            kind = "file" if spec.source == "file" else "module"
            raise UtuneError(
                f"the base model {recorded!r} runs code from the {kind} {spec.target!r}, which an artifact cannot "
                f"vouch for; if you trust that code, name it: --model {shlex.quote(recorded)} "
                "(in Python: load_tuned(DIR, model=SPEC_OR_MODULE))"
            )
        check_data_options(spec)
    except UtuneError as error:
        raise UtuneError(f"{path}: model: {error}") from None
    return recorded
