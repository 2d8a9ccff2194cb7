"""A progress bar per epoch: images done, loss, accuracy, images/s, ETA (rich, on stderr)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class EpochProgress:
    def __init__(self, epoch: int, epochs: int, images: int, enabled: bool = True):
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            disable=not enabled,  # under torchrun: rank 0 only
        )
        self._task = self._progress.add_task("train", total=images, info="")

    def __enter__(self) -> EpochProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def advance(self, images: int) -> None:
        self._progress.advance(self._task, images)

    def update(self, images: int, running: dict) -> None:
        seen = max(running["images"], 1)
        info = (
            f"loss {running['train_loss'] / seen:.3f}  "
            f"acc {running['train_accuracy'] / max(running.get('targets', seen), 1):.1%}  "
            f"{running['images'] / max(running['seconds'], 1e-9):.0f} img/s"
        )
        self._progress.update(self._task, advance=images, info=info)


def count_progress(field: str, enabled: bool = True, transient: bool = False) -> Progress:
    """A bar over a count of items on stderr: description, done/total, ``{task.fields[<field>]}``,
    elapsed and ETA (the benchmark's calls, the zoo's models)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[{field}]}}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=transient,
    )
