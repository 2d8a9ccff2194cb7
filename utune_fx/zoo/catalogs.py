"""The three catalogues the zoo runs, by name: what ``--models ci|all|NAMES`` selects, and how the
transformers and torchvision entries are built with their ground truth.

    select_models("transformers", "ci")  -> ["gpt2", "llama", ...]      (hf_catalog.CI_SAMPLE)
    select_models("transformers", "all") -> the curated entries, then those hf_discover found
    build_entry("transformers", "gpt2", record) -> (model, inputs, {"self_attention": 2, ...})
    build_entry("torchvision", "swin_t", record) -> (model, (x,), {"self_attention": 12, ...})

timm's entries are built in stages.py as before (no ground truth: one per family, 191 of them).
"""

from __future__ import annotations

import torch

from utune_fx.errors import UtuneError

CATALOGS = ("timm", "transformers", "torchvision")


def _ci_sample(catalog: str) -> tuple[str, ...]:
    if catalog == "transformers":
        from utune_fx.zoo.hf_catalog import CI_SAMPLE
    elif catalog == "torchvision":
        from utune_fx.zoo.torchvision_catalog import CI_SAMPLE
    else:
        from utune_fx.zoo.catalog import CI_SAMPLE
    return CI_SAMPLE


def _every_entry(catalog: str) -> list[str]:
    """The whole catalogue (timm's: the smallest model of each family, which sizes every model)."""
    if catalog == "transformers":
        from utune_fx.zoo.hf_catalog import hf_models

        return list(hf_models())
    if catalog == "torchvision":
        from utune_fx.zoo.torchvision_catalog import tv_models

        return tv_models()
    from utune_fx.zoo.catalog import families

    return families()


def select_models(catalog: str, which: str) -> list[str]:
    if catalog not in CATALOGS:
        raise UtuneError(f"--catalog {catalog!r}: use one of {', '.join(CATALOGS)}")
    if which == "ci":
        return list(_ci_sample(catalog))
    if which == "all":
        return _every_entry(catalog)
    names = [name.strip() for name in which.split(",") if name.strip()]
    if catalog == "timm":
        import timm

        known = set(timm.list_models())
    else:
        known = set(_every_entry(catalog))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UtuneError(
            f"--models {which!r}: {unknown[0] if unknown else 'nothing'} is not a {catalog} model"
            f"{' of the catalogue' if catalog != 'timm' else ''}; give 'ci', 'all' or names separated by commas"
        )
    return names


def entry_spec(catalog: str, name: str) -> str:
    """The model spec an entry stands for (``cli.py inspect SPEC`` builds the same model)."""
    if catalog == "transformers":
        from utune_fx.zoo.hf_catalog import hf_models

        return hf_models()[name]
    if catalog == "torchvision":
        from utune_fx.zoo.torchvision_catalog import tv_options

        return f"torchvision.models:{name}" + "".join(f"?{k}={v}" for k, v in tv_options(name).items())
    return f"timm:{name}"


def build_entry(catalog: str, name: str, record: dict) -> tuple[torch.nn.Module, tuple, dict]:
    """The model (random weights, eval mode), its example inputs and its expected counts; fills the
    record's parameters, meta, spec and input shapes."""
    record["spec"] = entry_spec(catalog, name)
    if catalog == "transformers":
        from utune_fx.specs import load_model
        from utune_fx.zoo.hf_catalog import expected_counts

        loaded = load_model(record["spec"])
        model, inputs, expected = loaded.model, loaded.inputs, expected_counts(loaded.model.config)
        record["meta"] = False
    else:
        from utune_fx.zoo.stages import META_PARAMETERS
        from utune_fx.zoo.torchvision_catalog import expected_counts, input_size, tv_build

        parameters = sum(p.numel() for p in tv_build(name, "meta").parameters())
        record["meta"] = parameters > META_PARAMETERS
        device = "meta" if record["meta"] else "cpu"
        torch.manual_seed(0)
        model = tv_build(name, device)
        inputs = (torch.randn(*input_size(name), generator=torch.Generator().manual_seed(0)).to(device),)
        expected = expected_counts(name)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["input_shapes"] = [list(x.shape) for x in inputs]
    return model, inputs, expected
