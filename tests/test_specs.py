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


# hf: specs (utune_fx/specs_hf.py): a transformers config with random weights, data only, no download


def test_hf_spec_builds_the_config_it_names_with_random_weights():
    import transformers

    text = "hf:gpt2/causal-lm?n_layer=2&n_embd=32&n_head=2&vocab_size=100"
    spec = parse_model_spec(text)
    assert (spec.source, spec.target, spec.options) == (
        "hf",
        "gpt2/causal-lm",
        {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100},
    )
    loaded = load_model(text)
    assert isinstance(loaded.model, transformers.GPT2LMHeadModel) and not loaded.model.training
    config = loaded.model.config  # the config transformers reads, not our parse of it
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 32, 100)
    assert sum(p.numel() for p in loaded.model.parameters()) == transformers.GPT2LMHeadModel(config).num_parameters()
    (ids,) = loaded.inputs
    assert ids.dtype == torch.int64 and ids.shape == (2, 8) and 0 <= int(ids.min()) and int(ids.max()) < 100
    assert torch.equal(load_model(text).model.lm_head.weight, loaded.model.lm_head.weight)  # seeded


def test_hf_encoder_decoder_inputs_follow_forward_and_differ_in_length():
    t5 = "hf:t5?num_layers=1&d_model=16&d_kv=8&num_heads=2&d_ff=32&vocab_size=50"
    ids, mask, decoder_ids = load_model(t5).inputs  # T5Model.forward(input_ids, attention_mask, decoder_input_ids)
    assert (
        ids.shape == (2, 8) and torch.equal(mask, torch.ones(2, 8, dtype=torch.int64)) and decoder_ids.shape == (2, 5)
    )


def test_hf_dotted_options_set_sub_configs_and_vision_audio_inputs():
    clip = load_model(
        "hf:clip?text_config.num_hidden_layers=1&text_config.hidden_size=16&text_config.intermediate_size=32&text_config.num_attention_heads=2"
        "&vision_config.num_hidden_layers=1&vision_config.hidden_size=16&vision_config.intermediate_size=32&vision_config.num_attention_heads=2"
        "&vision_config.image_size=24&vision_config.patch_size=8&projection_dim=8"
    )
    assert clip.model.config.vision_config.image_size == 24 and clip.model.config.text_config.num_hidden_layers == 1
    assert [tuple(x.shape) for x in clip.inputs] == [(2, 8), (2, 3, 24, 24)]  # CLIPModel(input_ids, pixel_values)
    audio = load_model(
        "hf:wav2vec2?num_hidden_layers=1&hidden_size=16&num_attention_heads=2&intermediate_size=32"
        "&conv_dim=[8,8]&conv_kernel=[10,3]&conv_stride=[5,2]&num_conv_pos_embeddings=4&num_conv_pos_embedding_groups=2"
    )
    (values,) = audio.inputs
    with torch.no_grad():  # long enough for 8 frames of the feature encoder, as its own output says
        assert audio.model(values).last_hidden_state.shape[1] == 8


def test_hf_masked_autoencoder_gets_its_masking_noise_so_two_runs_agree():
    mae = load_model(
        "hf:vit_mae?hidden_size=16&num_hidden_layers=1&num_attention_heads=2&intermediate_size=32"
        "&image_size=32&patch_size=8"
    )
    pixels, noise = mae.inputs  # ViTMAEModel.forward(pixel_values, noise): one number per 8x8 patch
    assert noise.shape == (2, 16)
    with torch.no_grad():
        kept = mae.model(pixels, noise)
        assert torch.equal(mae.model(pixels, noise).last_hidden_state, kept.last_hidden_state)
        assert not torch.equal(mae.model(pixels).last_hidden_state, kept.last_hidden_state)  # it draws its own
    # the patches kept are those with the smallest noise, as MAE's random masking defines them
    assert torch.equal(kept.mask, (noise.argsort(1).argsort(1) >= 4).float())


@pytest.mark.parametrize(
    "text,message",
    [
        ("hf:gpt3", r"unknown transformers model type 'gpt3' .*did you mean .*gpt2"),
        ("hf:gpt2/translate", r"unknown task 'translate' .*causal-lm"),
        ("hf:gpt2?trust_remote_code=true", r"option 'trust_remote_code' .*loads code, weights or files"),
        ("hf:llama?quantization_config.load_in_8bit=true", r"option 'quantization_config.load_in_8bit'"),
        ("hf:bert?_attn_implementation=x", r"option '_attn_implementation'"),
        ("hf:gpt2?n_layer=100000", r"n_layer=100000 .*at most 256"),
        ("hf:gpt2?n_embd=120000&n_layer=200", r"would take .* GiB"),
        ("hf:gpt2?n_embd=33&n_head=2", r"transformers could not build|transformers rejects the config"),
        ("hf:bert?a.b.c.d.e=1", r"bad option 'a.b.c.d.e'"),
    ],
)
def test_hf_spec_errors_are_one_line(text, message):
    with pytest.raises(UtuneError, match=message) as caught:
        load_model(text)
    assert "\n" not in str(caught.value)
