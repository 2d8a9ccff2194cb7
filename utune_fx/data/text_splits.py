"""Text examples as fixed-length token batches: a local tokenizer, train/val selection, datasets.

    tokenizer = load_tokenizer("~/tokenizers/bert")      # AutoTokenizer, local files only, no remote code
    splits = load_text_data("jsonl:reviews.jsonl?text=review&label=stars", tokenizer, max_length=64, inputs=2)
    (input_ids, attention_mask), label = splits.train[0]  # int64 [64] each; an int (classification) or, for
                                                          # a causal LM, the input ids with -100 at padding

Every example is tokenised on access (the tokenizer's special tokens included), truncated to
``max_length`` tokens and padded after its tokens to exactly ``max_length``: the length the model was
traced at. ``inputs`` is the number of tensors the model takes: 1 (token ids) or 2 (ids and the
attention mask, 1 on tokens, 0 on padding). Train and validation examples are chosen as images are
(data/__init__.py select_train_val, stratified by label); a text source has no test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utune_fx.data import DataSplits, PoolDataset, _check_selection_args, select_train_val
from utune_fx.data.text import TextPool, read_text_source
from utune_fx.errors import UtuneError, first_line

MAX_LENGTH = 8192  # tokens; --max-length beyond it is refused
IGNORE = -100  # the label of a padding position (transformers' convention; train/tasks.py leaves it out)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(directory: str):
    """The Hugging Face tokenizer saved in ``directory`` (``tokenizer.save_pretrained``): local files only,
    never remote code. A missing folder, or one without tokenizer files, is one line."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UtuneError(
            f"--tokenizer {directory}: no such folder; give the folder a Hugging Face tokenizer was saved in "
            "(tokenizer.save_pretrained(DIR))"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UtuneError(
            f"--tokenizer {path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); give the "
            "folder a Hugging Face tokenizer was saved in (tokenizer.save_pretrained(DIR))"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as error:  # transformers reports a bad folder as many kinds of error
        raise UtuneError(
            f"cannot load the tokenizer in {path} ({first_line(error)}); give a folder that "
            "transformers.AutoTokenizer.from_pretrained reads without remote code"
        ) from error


def check_max_length(max_length: int) -> int:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= MAX_LENGTH:
        raise UtuneError(f"--max-length must be an integer from 2 to {MAX_LENGTH:,} tokens, got {max_length!r}")
    return max_length


class TextDataset(PoolDataset):
    """The examples ``indices`` of a text pool, tokenised on access to ``max_length`` tokens."""

    def __init__(self, pool: TextPool, indices: np.ndarray, tokenizer, max_length: int, inputs: int, causal: bool):
        super().__init__(pool, indices)
        self.tokenizer, self.max_length, self.inputs, self.causal = tokenizer, max_length, inputs, causal
        self.pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def __getitem__(self, position: int):
        index = int(self.indices[position])
        tokens = self.tokenizer(self.pool.texts[index], truncation=True, max_length=self.max_length)["input_ids"]
        ids = torch.full((self.max_length,), self.pad, dtype=torch.int64)
        ids[: len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
        mask = torch.zeros(self.max_length, dtype=torch.int64)
        mask[: len(tokens)] = 1
        inputs = (ids, mask)[: self.inputs]
        if self.causal:  # the model predicts its own input ids; padding is not predicted
            return inputs, ids.masked_fill(mask == 0, IGNORE)
        return inputs, int(self.pool.labels[index])


def load_text_data(
    spec: str,
    tokenizer,
    *,
    max_length: int,
    inputs: int,
    shots: int | None = None,
    train_size: int | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
) -> DataSplits:
    """Read a text spec (data/text.py), choose train/val examples, tokenise them on access."""
    check_max_length(max_length)
    _check_selection_args(shots, train_size, val_size, seed)
    source = read_text_source(spec)
    causal = source.task == "causal-lm"
    if causal and shots is not None:
        raise UtuneError(
            f"--shots counts examples per class, and {spec} has no labels (causal language modelling); "
            "use --train-size N"
        )
    labels, classes = source.pool.labels, source.classes or ["text"]  # one class: selection draws at random
    train, val = select_train_val(
        labels,
        np.arange(len(source.pool)),
        classes,
        shots=shots,
        train_size=train_size,
        val_size=val_size,
        seed=seed,
    )

    def dataset(indices: np.ndarray) -> TextDataset:
        return TextDataset(source.pool, indices, tokenizer, max_length, inputs, causal)

    return DataSplits(train=dataset(train), val=dataset(val), test=None, classes=source.classes, task=source.task)
