"""Model specs and example inputs."""

import pytest
import torch
from torch import nn

from utune_fx.errors import UtuneError
from utune_fx.specs import build_model, load_model, parse_input_shape, parse_model_spec

TOY = "tests/toy_models.py"


def test_timm_spec_with_typed_options():
    spec = parse_model_spec("timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1&class_token=false&name=x")
    assert (spec.source, spec.target) == ("timm", "vit_tiny_patch16_224")
    assert spec.options == {"img_size": 32, "patch_size": 8, "depth": 1, "class_token": False, "name": "x"}


def test_timm_input_shape_follows_img_size_and_in_chans():
    loaded = load_model("timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=1&in_chans=1")
    assert [tuple(x.shape) for x in loaded.inputs] == [(2, 1, 32, 32)]
    assert not loaded.model.training


def test_import_spec_builds_with_options():
    model = build_model(parse_model_spec("torch.nn:Linear?in_features=4&out_features=2"))
    assert isinstance(model, nn.Linear) and model.weight.shape == (2, 4)


def test_file_spec_and_module_instances():
    assert type(load_model(f"{TOY}:build_gated_net", ["2,16"]).model).__name__ == "GatedNet"
    instance = load_model(f"{TOY}:shared_linear", ["3,4"]).model
    assert isinstance(instance, nn.Linear) and instance.in_features == 4


def test_input_shapes_with_dtypes():
    assert parse_input_shape("2,3,224,224") == ((2, 3, 224, 224), torch.float32)
    assert parse_input_shape("2x16:int64") == ((2, 16), torch.int64)
    loaded = load_model("torch.nn:Embedding?num_embeddings=5&embedding_dim=3", ["2,7:int64"])
    (ids,) = loaded.inputs
    assert ids.dtype == torch.int64 and ids.shape == (2, 7) and int(ids.max()) < 2


def test_inputs_are_repeatable():
    first = load_model(f"{TOY}:build_gated_net", ["2,16"]).inputs[0]
    second = load_model(f"{TOY}:build_gated_net", ["2,16"]).inputs[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "text,input_shapes,message",
    [
        (
            "timm:vit_bse_patch16_224",
            None,
            r"unknown timm model 'vit_bse_patch16_224' .*did you mean vit_base_patch16_224",
        ),
        ("vit_base_patch16_224", None, r"cannot read model spec .*did you mean timm:vit_base_patch16_224\?"),
        ("timm:resnet18?bogus=1", None, r"timm model 'resnet18' rejects the options .*bogus"),
        ("no_such_pkg.models:build", None, r"cannot import module 'no_such_pkg.models' .*is the package installed\?"),
        ("missing/model.py:build", None, r"model file 'missing/model.py' not found"),
        (f"{TOY}:nothing_here", None, r"has no attribute 'nothing_here'"),
        (f"{TOY}:not_a_model", None, r"callable .*not_a_model returned int, not a torch.nn.Module"),
        (f"{TOY}:shared_linear?x=1", None, r"is a module instance; options \['x'\] cannot apply"),
        (f"{TOY}:build_gated_net", None, r"cannot tell the input shape .*pass --input-shape"),
        ("timm:resnet18", ["2,three,4"], r"bad --input-shape '2,three,4'"),
        ("timm:resnet18", ["2,3:complex"], r"bad dtype 'complex'"),
        ("timm:resnet18", ["0,3,8,8"], r"bad --input-shape '0,3,8,8'"),
    ],
)
def test_spec_errors_are_one_line_and_say_what_to_do(text, input_shapes, message):
    with pytest.raises(UtuneError, match=message) as caught:
        load_model(text, input_shapes)
    assert "\n" not in str(caught.value)
