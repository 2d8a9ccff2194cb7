"""Training on text: the model traced at the shape of a real batch, text data read against that model.

    shapes = text_input_shapes(model, 64)        # ["2,64:int64", "2,64:int64"]: input_ids, attention_mask
    splits = load_text_splits(result, "jsonl:reviews.jsonl?text=review&label=stars", "~/tok", None, seed=0)

A model traced by torch.export keeps its batch dynamic, not its sequence length, so a text model is
traced at ``--max-length`` tokens (64 by default) and every batch is padded or truncated to that length.
Its inputs follow its ``forward``: token ids, and the attention mask when ``attention_mask`` is the
very next parameter (BERT, RoBERTa, ...). A model that puts another parameter between them (GPT-2:
``cache``) is traced with the token ids alone: a causal LM needs no mask for padding placed after
the text, since no token attends to positions after its own, and the padding is never predicted.
"""

from __future__ import annotations

import inspect

from torch import nn

from utune_fx.errors import UtuneError
from utune_fx.train.outputs import output_logits_shape

DEFAULT_MAX_LENGTH = 64
EXAMPLE_BATCH = 2  # the batch of the example inputs (it stays dynamic)
_TEXT_MODELS = "hf:bert/sequence-classification?num_labels=K, hf:gpt2/causal-lm, ..."


def text_input_shapes(model: nn.Module, length: int) -> list[str]:
    """--input-shape values for a batch of ``length`` tokens: input_ids, and attention_mask when the model's
    forward takes it right after them."""
    names = [parameter.name for parameter in inspect.signature(model.forward).parameters.values()]
    count = 2 if names[1:2] == ["attention_mask"] else 1
    return [f"{EXAMPLE_BATCH},{length}:int64"] * count


def build_text_model(model: str, frontend: str, length: int, rule_sets: list, seed: int):
    """A model spec, built once, traced at ``length`` tokens and rewritten; its input shapes are recorded
    in the tuned artifact, so reloading it traces the same graph."""
    from utune_fx.rewrite.artifact import TunedSource, build_tuned
    from utune_fx.specs import load_model

    loaded = load_model(model)
    source = TunedSource(model, text_input_shapes(loaded.model, length), frontend)
    return build_tuned(source, rule_sets, seed, module=loaded.model)


def traced_sequence(module) -> tuple[int, int] | None:
    """(number of inputs, sequence length) of a graph traced on token batches [batch, length], or None."""
    shapes = []
    for node in module.graph.nodes:
        if node.op == "placeholder":
            info = node.meta.get("utune")
            shapes.append(tuple(info.shape) if info is not None and info.shape else None)
    if not 1 <= len(shapes) <= 2 or any(shape is None or len(shape) != 2 for shape in shapes):
        return None
    if len({shape[1] for shape in shapes}) != 1:
        return None
    return len(shapes), shapes[0][1]


def _check_vocabulary(result, tokenizer, tokenizer_dir) -> None:
    embeddings = getattr(result.base_model, "get_input_embeddings", None)
    layer = embeddings() if callable(embeddings) else None
    rows = getattr(layer, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise UtuneError(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer):,} tokens but the model's embedding only "
            f"{rows:,} rows; use the model's own tokenizer, or add ?vocab_size={len(tokenizer)} to an hf: spec"
        )


def _check_outputs(result, spec: str, splits) -> None:
    shape = output_logits_shape(result.module)
    if shape is None:
        return
    if splits.task == "causal-lm" and len(shape) != 3:
        raise UtuneError(
            f"{spec} holds texts without labels, so it trains a causal language model, whose logits are one per "
            f"token [batch, length, vocabulary]; this model returns {list(shape)}: use a causal LM "
            "(hf:gpt2/causal-lm, ...), or add &label=FIELD to train a sequence classifier"
        )
    if splits.task == "classification" and len(shape) != 2:
        raise UtuneError(
            f"{spec} has labels, so it trains a sequence classifier, whose logits are [batch, classes]; this "
            f"model returns {list(shape)}: use hf:TYPE/sequence-classification?num_labels="
            f"{len(splits.classes)}, or leave label= out to train a causal language model"
        )
    if splits.task == "classification":
        from utune_fx.train.session import check_classes

        check_classes(result, spec, splits)


def _tokenizer_needed(spec: str) -> UtuneError:
    return UtuneError(
        f"--data {spec} is text: give --tokenizer DIR, the folder of the Hugging Face tokenizer that turns "
        "it into the model's token ids"
    )


def prepare_text(data: str, tokenizer: str | None, max_length: int | None):
    """Before the model is built: (the loaded tokenizer, the length to trace at) for text data, (None, None)
    for images; flags that do not fit the data, and a bad tokenizer folder, are refused here."""
    from utune_fx.data.text import is_text_spec
    from utune_fx.data.text_splits import check_max_length, load_tokenizer

    if not is_text_spec(data):
        if tokenizer is not None or max_length is not None:
            raise UtuneError(f"--tokenizer and --max-length are for text data, and {data} holds images; drop them")
        return None, None
    if tokenizer is None:
        raise _tokenizer_needed(data)
    length = DEFAULT_MAX_LENGTH if max_length is None else check_max_length(max_length)
    return load_tokenizer(tokenizer), length


def load_text_splits(result, spec: str, tokenizer, max_length: int | None, **selection):
    """Text splits tokenised at the traced model's sequence length (``max_length``, when given, must be it)."""
    from utune_fx.data.text_splits import check_max_length, load_text_data, load_tokenizer

    if tokenizer is None:
        raise _tokenizer_needed(spec)
    traced = traced_sequence(result.module)
    if traced is None:
        raise UtuneError(
            f"--data {spec} is text, but the model does not take token ids [batch, length] (and at most an "
            f"attention mask of that shape); train a text model ({_TEXT_MODELS})"
        )
    inputs, length = traced
    if max_length is not None and check_max_length(max_length) != length:
        raise UtuneError(
            f"the model was traced at {length} tokens, not --max-length {max_length} (a tuned model keeps the "
            f"sequence length it was traced at); pass --max-length {length}, or train the model spec with "
            f"--rules and --max-length {max_length}"
        )
    loaded = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _check_vocabulary(result, loaded, tokenizer)
    chosen = {name: selection[name] for name in ("shots", "train_size", "val_size", "seed") if name in selection}
    splits = load_text_data(spec, loaded, max_length=length, inputs=inputs, **chosen)
    _check_outputs(result, spec, splits)
    return splits
