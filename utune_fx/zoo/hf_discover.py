"""The transformers catalogue's other entries: every model type registered beyond the curated ones
(hf_catalog.HF_MODELS), shrunk, built, run and checked; run by a person, never at import time.

    OMP_NUM_THREADS=1 python -m utune_fx.zoo.hf_discover --jobs 2    # every model type (~30 CPU minutes)
    python -m utune_fx.zoo.hf_discover --only mt5,umt5                # re-check some, keep the rest
    shrink_options(AutoConfig.for_model("bart")) -> {"d_model": 32, "encoder_layers": 2, ..., "vocab_size": 1000}

Each model type with a base model (``AutoModel``) gets its default config shrunk by one table
(``SMALL``, on the config and its sub-configs, never growing a field), is built as the ``hf:`` spec
that makes (specs.build_model / load_model, as the zoo does) and run once on the spec's example
inputs, where truth.structure must count the attentions hf_catalog.expected_counts(config) gives
(FFNs are the matcher's to find, in the zoo; their count is recorded). Each runs in a forked process
with CPU, clock and memory limits, output discarded; a journal beside the file lets a run resume.
The result, utune_fx/zoo/hf_discovered.json (schemas/hf_discovered.schema.json, written through a
temporary name), holds per model type ``{"spec", "expected"}`` or ``{"excluded": "kind: why"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

import utune_fx  # noqa: F401  (before transformers: torchvision's op schemas)
from utune_fx.errors import UtuneError, first_line
from utune_fx.zoo.hf_catalog import DISCOVERED_JSON, HF_MODELS, spec_model_type

FORMAT = "utune_fx.hf_discovered/1"
# every size field a config may spell, and the value the curated entries give it (a list field, such
# as Swin's per-stage num_heads, gets it per element); a default already smaller stays as it is
SMALL = {
    **dict.fromkeys("hidden_size d_model n_embd dim embed_dim".split(), 32),
    **dict.fromkeys("num_hidden_layers num_layers n_layer n_layers encoder_layers decoder_layers".split(), 2),
    **dict.fromkeys("num_decoder_layers depth".split(), 2),
    **dict.fromkeys("num_attention_heads n_head n_heads num_heads num_key_value_heads".split(), 2),
    **dict.fromkeys("encoder_attention_heads decoder_attention_heads".split(), 2),
    **dict.fromkeys("intermediate_size ffn_dim encoder_ffn_dim decoder_ffn_dim d_ff n_inner mlp_dim".split(), 64),
    **dict.fromkeys("moe_intermediate_size shared_expert_intermediate_size".split(), 64),
    **dict.fromkeys("head_dim d_kv v_head_dim kv_lora_rank q_lora_rank".split(), 16),
    # multi-head latent attention (DeepSeek): the rotary part is head_dim, qk_head_dim the sum
    **{"qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "qk_head_dim": 32},
    **{"depths": 1, "projection_dim": 16, "vocab_size": 1000, "image_size": 32, "patch_size": 8},
}  # depths: layers per stage (Swin-like), one in each
VOCABULARY = SMALL["vocab_size"]
TOKEN_FIELD = re.compile(r"^[^_].*token_(id|index)$")  # pad_token_id, image_token_index: inside the vocabulary
SUB_CONFIG_DEPTH = 3  # an hf: option names at most 4 fields (specs._MAX_OPTION_NESTING)
KINDS = ("no base model", "config", "build", "inputs", "counts", "forward", "time limit", "crash")
TIME_LIMIT_S, WALL_FACTOR, MEMORY_GB = 120.0, 10, 8.0  # CPU seconds; the clock's limit is 10 times that
FAILED = {"config": "the default config cannot be made ({})", "inputs": "the spec cannot make its example inputs ({})"}
FAILED |= {"counts": "the config gives no counts ({})", "build": "{}", "forward": "{}"}  # why, by step


def _levels(config, prefix: str = "") -> list[tuple[str, dict]]:
    """(option prefix, fields) for the config and its sub-configs: ('', ...), ('text_config.', ...)."""
    levels = [(prefix, config.to_dict())]
    if prefix.count(".") < SUB_CONFIG_DEPTH:
        for name in sorted(getattr(config, "sub_configs", None) or {}):
            sub = getattr(config, name, None)
            if sub is not None and hasattr(sub, "to_dict"):
                levels += _levels(sub, f"{prefix}{name}.")
    return levels


def _ints(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _shrunk(value, small: int):
    """``value`` no larger than ``small`` (per element for a list of ints); None where not a size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return min(value, small)
    if isinstance(value, list) and value and len(_ints(value)) == len(value):
        return [min(v, small) for v in value]
    return None


def shrink_options(config) -> dict:
    """The hf: options that make ``config`` small: SMALL on every level, token ids moved into the
    smaller vocabulary (distinct ids stay distinct, counted down from its end)."""
    levels = _levels(config)
    options = {}
    for prefix, fields in levels:
        for name, small in SMALL.items():
            value = _shrunk(fields.get(name), small)
            if value is not None and value != fields[name]:
                options[prefix + name] = value
    if not any(key.rpartition(".")[2] == "vocab_size" for key in options):
        return options
    outside = sorted(
        {v for _, fields in levels for name, value in fields.items() if TOKEN_FIELD.search(name) for v in _ints(value)}
        - set(range(VOCABULARY))
    )
    moved = {old: VOCABULARY - 1 - index for index, old in enumerate(outside)}
    for prefix, fields in levels:
        for name, value in fields.items():
            if TOKEN_FIELD.search(name) and set(_ints(value)) & set(moved):
                options[prefix + name] = [moved.get(v, v) for v in value] if isinstance(value, list) else moved[value]
    return options


def _excluded(kind: str, why: str) -> dict:
    assert kind in KINDS
    return {"excluded": f"{kind}: {why}".replace("\n", " ")[:300]}


def check_model_type(model_type: str) -> dict:
    """{"spec", "expected"} when the shrunk model builds, runs and has its config's attentions; else
    {"excluded": "kind: why"}."""
    import transformers

    from utune_fx.specs import build_model, load_model, parse_model_spec
    from utune_fx.zoo.hf_catalog import expected_counts, make_spec
    from utune_fx.zoo.truth import structure

    stage, spec = "config", "hf:"
    try:
        spec = make_spec(model_type, shrink_options(transformers.AutoConfig.for_model(model_type)))
        stage = "build"
        model = build_model(parse_model_spec(spec))
        stage = "inputs"
        inputs = load_model(spec, module=model).inputs
        stage = "counts"
        expected = expected_counts(model.config)
        stage = "forward"
        found = structure(model, inputs).counts()
    except Exception as error:
        why = re.sub(r"'hf:[^']*'?", "the spec", (str(error).strip().splitlines() or [""])[0])  # the reason fits
        return _excluded(stage, FAILED[stage].format(f"{type(error).__name__}: {why}"))
    differing = [f"{expected[k]} {k} by the config, {found[k]} run" for k in found if found[k] != expected[k]]
    if differing:
        return _excluded("counts", "; ".join(differing))
    return {"spec": spec, "expected": expected}


def _child(model_type: str, sender, time_limit: float, memory_gb: float) -> None:
    """In the forked process: quiet, bounded in CPU time and memory, one result down the pipe, gone."""
    for descriptor in (1, 2):  # C libraries' output too
        os.dup2(os.open(os.devnull, os.O_WRONLY), descriptor)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (this process ends below)
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 2**30),) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (int(time_limit), int(time_limit) + 5))  # SIGXCPU, later SIGKILL
    try:
        result = check_model_type(model_type)
    except BaseException as error:  # MemoryError, RecursionError...: still one line for the file
        result = _excluded("crash", first_line(error))
    sender.send(result)
    sender.close()
    os._exit(0)  # no atexit handlers or library teardown: the parent has what it needs


def _start(model_type: str, time_limit: float, memory_gb: float):
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(model_type, sender, time_limit, memory_gb), daemon=True)
    process.start()
    sender.close()  # the child holds the only writer: its death is an end of file here
    return process, receiver


def _finish(process, receiver, answered: bool, time_limit: float) -> dict:
    result = None
    with contextlib.suppress(EOFError):  # an end of file: died before sending
        result = receiver.recv() if answered else None
    process.kill()
    process.join()
    receiver.close()
    if result is not None or not answered:
        return result or _excluded("time limit", f"not done within {WALL_FACTOR * time_limit:g} s (wall clock)")
    if process.exitcode == -signal.SIGXCPU:
        return _excluded("time limit", f"over {time_limit:g} s of CPU time")
    return _excluded("crash", f"the process died with exit code {process.exitcode} (negative: signal)")


def run_isolated(
    names: list[str], jobs: int = 1, time_limit: float = TIME_LIMIT_S, memory_gb: float = MEMORY_GB
) -> Iterator[tuple[str, dict]]:
    """(name, check_model_type(name)) as each finishes, each in a process forked from this one (the
    imports done once), ``jobs`` at a time, ended past ``time_limit`` CPU seconds (a fair limit on a
    busy machine) or WALL_FACTOR times that on the clock (a hang); no thread is started."""
    waiting, running = list(reversed(names)), {}  # receiver -> (name, process, deadline)
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop()
            process, receiver = _start(name, time_limit, memory_gb)
            running[receiver] = (name, process, time.monotonic() + WALL_FACTOR * time_limit)
        first_deadline = min(deadline for _, _, deadline in running.values())
        ready = multiprocessing.connection.wait(list(running), max(0.0, first_deadline - time.monotonic()))
        for receiver, (name, process, deadline) in list(running.items()):
            if receiver in ready or time.monotonic() >= deadline:
                del running[receiver]
                yield name, _finish(process, receiver, receiver in ready, time_limit)


def registered_model_types() -> tuple[list[str], set[str]]:
    """(every model type transformers registers, those with a base model)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES), set(MODEL_MAPPING_NAMES) & set(CONFIG_MAPPING_NAMES)


def _journal(path: Path, version: str) -> tuple[Path, dict]:
    """Where a whole run notes each result as it comes, and what it noted with this transformers."""
    journal, done = path.with_name(f".{path.name}.partial"), {}
    for line in journal.read_text().splitlines() if journal.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by a kill
            entry = json.loads(line)
            done |= {entry["model"]: entry["result"]} if entry.get("transformers") == version else {}
    return journal, done


def discover(names: list[str] | None, path: Path = DISCOVERED_JSON, progress: bool = True, **limits) -> dict:
    """The file's content: every model type outside the curated ones, resuming from the journal, or
    (``names``) those re-checked and the rest kept from ``path``. ``limits``: run_isolated's."""
    import transformers
    from tqdm import tqdm

    from utune_fx.zoo.hf_catalog import read_discovered

    version, (registered, with_base) = transformers.__version__, registered_model_types()
    curated = {spec_model_type(spec) for spec in HF_MODELS.values()}
    if names is not None and read_discovered(path)["transformers"] != version:
        raise UtuneError(f"{path} is from another transformers; rerun the whole discovery (without --only)")
    unknown = [name for name in names or [] if name not in registered or name in curated]
    if unknown:
        raise UtuneError(f"--only: {unknown[0]} is not a registered model type outside the curated catalogue")
    todo = names if names is not None else [name for name in registered if name not in curated]
    journal, noted = _journal(path, version)
    if names is not None:  # re-checked, not resumed
        noted = {name: entry for name, entry in read_discovered(path)["models"].items() if name not in names}
    no_base = _excluded("no base model", "AutoModel has no class for it")
    models = noted | {name: no_base for name in todo if name not in with_base}
    checks = [name for name in todo if name not in models]
    tqdm.monitor_interval = 0  # no monitor thread: the parent forks, and a fork copies no other thread
    with journal.open("a") as sink, tqdm(total=len(checks), unit="model", disable=not progress) as bar:
        for name, result in run_isolated(checks, **limits):
            models[name] = result
            sink.write(json.dumps({"transformers": version, "model": name, "result": result}) + "\n")
            sink.flush()
            bar.set_postfix_str(name, refresh=False)
            bar.update()
    content = {"format": FORMAT, "transformers": version, "time_limit_s": limits.get("time_limit", TIME_LIMIT_S)}
    counts = {"registered": len(registered), "with_base_model": len(with_base)}
    return content | counts | {"models": dict(sorted(models.items()))}


def write_discovered(content: dict, path: Path = DISCOVERED_JSON) -> None:
    """Checked against the schema, then written whole (a temporary name beside it, renamed)."""
    from utune_fx.atomic import write_text
    from utune_fx.schemas import check_json

    check_json(content, "hf_discovered", str(path))
    write_text(path, json.dumps(content, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utune_fx.zoo.hf_discover", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="model types to re-check, separated by commas; the file's others are kept")
    parser.add_argument("--jobs", type=int, default=1, help="model types checked at a time")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="CPU seconds per model type")
    parser.add_argument("-o", "--output", type=Path, default=DISCOVERED_JSON, help="where to write the JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from configs only: nothing to download
    torch.set_num_threads(1)
    names = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    try:
        content = discover(names, args.output, jobs=args.jobs, time_limit=args.time_limit)
        write_discovered(content, args.output)
    except UtuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _journal(args.output, "")[0].unlink(missing_ok=True)  # written: nothing left to resume
    entries = content["models"].values()
    kinds = Counter(entry["excluded"].partition(":")[0] for entry in entries if "excluded" in entry)
    print(
        f"transformers {content['transformers']}: {content['registered']} model types registered, "
        f"{content['with_base_model']} with a base model, {len(HF_MODELS)} curated\n"
        f"discovered (built, ran, attentions as the config says): {sum('spec' in e for e in entries)}"
    )
    print("".join(f"excluded, {kind}: {count}\n" for kind, count in kinds.most_common()) + f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
