"""What a training run optimises and measures, by the kind of data: classes, or the next token.

    task = task_named(splits.task)                  # "classification" (images, labelled text) or "causal-lm"
    loss = task.loss(logits, labels, smoothing)     # the mean training loss of a batch
    loss_sum, targets = task.loss_sum(logits, labels, smoothing)   # its sum and count: a batch split over
                                                    # processes is weighed by the whole batch's count (loop.py)
    loss_sum, correct, targets = task.sums(logits, labels)   # evaluation: summed, unsmoothed

classification: logits [B, K], labels [B]; cross-entropy, top-1 accuracy; a target is an example.
causal-lm:      logits [B, L, V], labels [B, L] (the input ids, -100 at padding); position i predicts
                token i + 1 (the shift transformers' own causal-LM loss makes), positions labelled -100
                are left out; a target is a predicted token, accuracy is token accuracy and evaluation
                adds perplexity (exp of the mean loss per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utune_fx.data.text_splits import IGNORE  # the label of a padding position: not predicted


class Classification:
    name = "classification"

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0):
        """The summed training loss (a tensor) and how many targets it sums over; loss() is their ratio."""
        return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="sum"), len(labels)

    def sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        return (F.cross_entropy(logits, labels, reduction="sum").item(), *self.correct(logits, labels))

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        return (logits.argmax(-1) == labels).sum().item(), len(labels)

    def metrics(self, loss: float, correct: int, targets: int) -> dict:
        return {"loss": loss / max(targets, 1), "accuracy": correct / max(targets, 1)}


class CausalLanguageModel(Classification):
    name = "causal-lm"

    @staticmethod
    def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position i's logits against token i + 1, flattened."""
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
        predictions, targets = self._shifted(logits, labels)
        if not (targets != IGNORE).any():  # no token to predict (texts of one token): no gradient, no NaN
            return predictions.sum() * 0.0
        return F.cross_entropy(predictions, targets, ignore_index=IGNORE, label_smoothing=smoothing)

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0):
        predictions, targets = self._shifted(logits, labels)
        summed = F.cross_entropy(predictions, targets, ignore_index=IGNORE, label_smoothing=smoothing, reduction="sum")
        return summed, int((targets != IGNORE).sum().item())  # no token to predict: 0, with a zero gradient

    def sums(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
        predictions, targets = self._shifted(logits, labels)
        loss = F.cross_entropy(predictions, targets, ignore_index=IGNORE, reduction="sum").item()
        return (loss, *self.correct(logits, labels))

    def correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        predictions, targets = self._shifted(logits, labels)
        kept = targets != IGNORE
        return (predictions.argmax(-1)[kept] == targets[kept]).sum().item(), int(kept.sum().item())

    def metrics(self, loss: float, correct: int, targets: int) -> dict:
        measured = super().metrics(loss, correct, targets)
        return measured | {"perplexity": math.exp(min(measured["loss"], 700.0))}  # exp overflows past ~709


TASKS = {task.name: task for task in (Classification(), CausalLanguageModel())}
CLASSIFICATION = TASKS["classification"]


def task_named(name: str):
    return TASKS[name]
