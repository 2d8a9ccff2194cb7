"""Training tuned models: ``train(module, train_set, val_set, TrainConfig(...), out)``.

See loop.py for the loop, checkpoint.py for what a checkpoint holds, optim.py for the
optimizer groups and schedule, rundir.py for the run directory (its lock, the settings
--resume holds to, results that agree), devices.py for --device.
"""

from utune_fx.train.config import TrainConfig
from utune_fx.train.loop import evaluate, pick_device, train

__all__ = ["TrainConfig", "evaluate", "pick_device", "train"]
