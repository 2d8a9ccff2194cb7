"""Model cards: a JSON file that says how to build a pretrained model, used as a model spec.

    python cli.py rewrite path/to/vit-split-cifar-a.json --rules rules/lora.yaml -o out/
    python cli.py train path/to/card.json?num_classes=10 ...     options override the card's kwargs

A card holds (only ``timm_model`` is required; other fields are kept as notes)::

    {"timm_model": "vit_tiny_patch16_224",
     "kwargs": {"img_size": 32, "patch_size": 4, "num_classes": 5, "depth": 6, ...},
     "weights": "vit-split-cifar-a.safetensors",        default: the card's name with .safetensors
     "normalisation": {"mean": [...], "std": [...]},     what the model was trained with
     "crop_pct": 1.0}                                    default 1.0: evaluated on the whole image

A card is data, read through utune_fx/schemas against card.schema.json: a
bounded file, kwargs that are numbers, strings, booleans or lists of them (never
a mapping, never the timm options that read files), RGB statistics of three
finite numbers (std above 0), crop_pct in (0, 1]. A wrong field is one line
naming the card and the field.

The weights (safetensors, relative paths from the card's folder) load through
utune_fx/weights.py, so a re-sized classifier starts fresh and any other
mismatch is named; ``?weights=none`` builds the same architecture randomly
initialised. The model's ``pretrained_cfg`` gets the card's input size and
normalisation, so training and evaluation transforms follow the card.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from utune_fx.errors import UtuneError
from utune_fx.schemas import read_json


def read_card(path: Path) -> dict:
    """The card at ``path``: bounded, schema-checked; one line naming the card and the field otherwise."""
    if not path.is_file():  # a FIFO or /dev/zero behind the name would block or never end
        state = "is not a regular file" if path.exists() else "does not exist"
        raise UtuneError(f"model card {path} {state}; check the path")
    return read_json(path, "card", "see utune_fx/schemas/card.schema.json for a model card's fields")


def _weights_path(card: dict, path: Path, given) -> str | None:
    if given is not None:
        return None if str(given).lower() == "none" else str(given)
    named = card.get("weights")
    weights = path.parent / named if isinstance(named, str) else path.with_suffix(".safetensors")
    if not weights.is_file():
        raise UtuneError(
            f"model card {path}: its weights {weights} do not exist; put them there, "
            "pass --weights FILE, or ?weights=none for a random initialisation"
        )
    return str(weights)


def create_from_card(spec) -> nn.Module:
    """Build the card's timm model with its kwargs (spec options override them) and weights."""
    from utune_fx.specs import ModelSpec, _create_timm, timm_input_size

    path = Path(spec.target).expanduser()
    card = read_card(path)
    options = {**card.get("kwargs", {}), **spec.options}
    options["weights"] = _weights_path(card, path, options.get("weights"))
    if options["weights"] is None:
        del options["weights"]
    model = _create_timm(ModelSpec(spec.text, "timm", card["timm_model"], None, options))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = timm_input_size(model, options) or (options.get("in_chans", 3), 224, 224)
    cfg.update({key: tuple(value) for key, value in card.get("normalisation", {}).items() if key in ("mean", "std")})
    cfg["crop_pct"] = float(card.get("crop_pct", 1.0))
    model.pretrained_cfg = cfg
    return model
