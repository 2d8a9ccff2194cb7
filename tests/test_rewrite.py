"""The rewriter: identity at init, numerics of every position away from
identity (against eager PyTorch with forward hooks), freezing, refusals."""

import math
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from utune_fx.errors import UtuneError
from utune_fx.match import load_rules
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace

RULES = Path(__file__).resolve().parents[1] / "rules"
INSERTED = [
    "dual_utuner",
    "utuner_mha",
    "utuner_ffn",
    "utuner_block",
    "utuner_first_layer",
    "lora",
    "adapter",
    "prefix",
    "prefix_parallel",
    "vpt_deep",
    "vpt_shallow",
]
EXISTING = ["bitfit", "linear_probe", "full_finetune"]
ATOL = {torch.float32: 1e-5}

ARCHS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2), 32),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=56, depth=2, num_classes=10), 56),
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 224),
    "resnet": ("resnet18", {}, 64),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1)), 64),
}


def _model(arch):
    name, kwargs, size = ARCHS[arch]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval(), torch.randn(2, 3, size, size)


def _rules(tmp_path, body):
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(body))
    return load_rules(path)


@pytest.mark.parametrize("arch", ["vit", "deit", "beit", "eva", "swin"])
@pytest.mark.parametrize("rule_file", INSERTED + EXISTING)
def test_every_rewrite_starts_as_the_frozen_model(rule_file, arch):
    model, x = _model(arch)
    with torch.no_grad():
        reference = model(x)
    result = rewrite(trace(model, x), load_rules(RULES / f"{rule_file}.yaml"))
    assert all(s.regions > 0 for s in result.summaries), [(s.rule, s.regions) for s in result.summaries]
    with torch.no_grad():
        assert torch.equal(result.module(x), reference)


CNN_RULE_FILES = ["lora", "utuner_block"] + EXISTING


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
@pytest.mark.parametrize("rule_file", CNN_RULE_FILES)
def test_cnn_rule_files_start_as_the_frozen_model(rule_file, arch):
    model, x = _model(arch)
    with torch.no_grad():
        reference = model(x)
    rules = load_rules(RULES / f"{rule_file}.yaml")
    result = rewrite(trace(model, x), rules)
    placed = {s.rule: s.regions for s in result.summaries}
    # every rule places tuners, but a fallback that stood by and a rule whose fallback did (lora.yaml)
    fallbacks = {rule.name for rule in rules.rules if rule.fallback_for}
    covered = {
        name for rule in rules.rules if rule.fallback_for and placed.get(rule.name) for name in rule.fallback_for
    }
    assert all(placed[name] > 0 for name in placed if name not in fallbacks | covered), placed
    assert not fallbacks or any(placed.get(name) for name in fallbacks), placed
    with torch.no_grad():
        assert torch.equal(result.module(x), reference)


def _randomise(module: nn.Module) -> None:
    torch.manual_seed(1)
    for name, parameter in module.named_parameters():
        if name.startswith("utune."):
            with torch.no_grad():
                parameter.normal_(0, 0.2)


def output_with(model, x, handles):
    """The model's output while the hooks are in place; they are removed afterwards."""
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()


def _compare(result, model, x, hooks):
    _randomise(result.module)
    expected = output_with(model, x, [module.register_forward_hook(hook) for module, hook in hooks])
    with torch.no_grad():
        got = result.module(x)
    assert not torch.allclose(got, model(x).detach(), atol=1e-3), "tuners had no effect"
    torch.testing.assert_close(got, expected, atol=ATOL[torch.float32], rtol=1e-5)


def test_parallel_position_adds_u_of_the_region_input(tmp_path):
    model, x = _model("vit")
    result = rewrite(trace(model, x), load_rules(RULES / "dual_utuner.yaml"))
    tuners = dict(result.module.named_modules())
    hooks = []
    for i, block in enumerate(model.blocks):
        for rule, part in (("mha", block.attn), ("ffn", block.mlp)):
            adapter = tuners[f"utune.{rule}.{i}"]
            hooks.append((part, lambda mod, inp, out, a=adapter: out + a(inp[0])))
    _compare(result, model, x, hooks)


def test_sequential_position_adds_u_of_the_region_output():
    model, x = _model("vit")
    result = rewrite(trace(model, x), load_rules(RULES / "adapter.yaml"))
    tuners = dict(result.module.named_modules())
    hooks = [
        (block.mlp, lambda mod, inp, out, a=tuners[f"utune.ffn_adapter.{i}"]: out + a(out))
        for i, block in enumerate(model.blocks)
    ]
    _compare(result, model, x, hooks)


def test_reparameterised_lora_on_linears():
    model, x = _model("vit")
    result = rewrite(trace(model, x), load_rules(RULES / "lora.yaml"))
    tuners = dict(result.module.named_modules())
    linears = [layer for block in model.blocks for layer in (block.attn.qkv, block.attn.proj)]
    hooks = [
        (layer, lambda mod, inp, out, a=tuners[f"utune.lora.{i}"]: out + a(inp[0])) for i, layer in enumerate(linears)
    ]
    _compare(result, model, x, hooks)


def test_lora_on_convolutions_and_adapters_on_feature_maps(tmp_path):
    model, x = _model("convnext")
    rules = _rules(
        tmp_path,
        """
        version: 1
        rules:
          - {name: convs, match: {node: {kind: conv, scope: "stages.*.blocks.*.conv_dw"}}, tuner: lora, settings: {rank: 4}}
          - {name: blocks, match: block, tuner: parallel_adapter, settings: {hidden: 4}}
        """,
    )
    result = rewrite(trace(model, x), rules)
    tuners = dict(result.module.named_modules())
    blocks = [block for stage in model.stages for block in stage.blocks]
    hooks = [
        (block.conv_dw, lambda mod, inp, out, a=tuners[f"utune.convs.{i}"]: out + a(inp[0]))
        for i, block in enumerate(blocks)
    ]
    hooks += [
        (block, lambda mod, inp, out, a=tuners[f"utune.blocks.{i}"]: out + a(inp[0])) for i, block in enumerate(blocks)
    ]
    assert isinstance(tuners["utune.blocks.0"].down, nn.Conv2d)  # feature maps: 1x1 convs
    _compare(result, model, x, hooks)


def test_strided_adapters_on_downsampling_resnet_blocks():
    model, x = _model("resnet")
    result = rewrite(trace(model, x), load_rules(RULES / "utuner_block.yaml"))
    tuners = dict(result.module.named_modules())
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    assert tuners["utune.block.2"].down.stride == (2, 2)  # layer2.0 halves the feature map
    seen = {}
    hooks = []
    for i, block in enumerate(blocks):  # U(block input) joins the sum before the block's last activation
        hooks.append((block, None))
        block.register_forward_pre_hook(lambda mod, inp, i=i: seen.__setitem__(i, inp[0]))
        hooks.append((block.bn2, lambda mod, inp, out, i=i, a=tuners[f"utune.block.{i}"]: out + a(seen[i])))
    _compare(result, model, x, [(m, h) for m, h in hooks if h is not None])


def test_scale_shift_on_norm_outputs(tmp_path):
    model, x = _model("vit")
    result = rewrite(
        trace(model, x),
        _rules(
            tmp_path,
            """
        version: 1
        rules: [{name: ssf, match: norm, tuner: scale_shift}]
        """,
        ),
    )
    tuners = dict(result.module.named_modules())
    norms = [n for block in model.blocks for n in (block.norm1, block.norm2)] + [model.norm]
    hooks = [
        (norm, lambda mod, inp, out, t=tuners[f"utune.ssf.{i}"]: out * (1 + t.scale) + t.shift)
        for i, norm in enumerate(norms)
    ]
    _compare(result, model, x, hooks)


def test_only_tuners_and_selected_parameters_train():
    model, x = _model("vit")
    result = rewrite(trace(model, x), load_rules(RULES / "dual_utuner.yaml"))
    trainable = {name for name, p in result.module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in result.module.named_parameters() if n.startswith(("utune.", "head."))}
    assert result.trainable_parameters == sum(s.added_parameters + s.trained_parameters for s in result.summaries)
    _randomise(result.module)
    result.module(x).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in result.module.parameters())


def test_head_is_resized_to_num_classes(tmp_path):
    model, x = _model("vit")
    result = rewrite(
        trace(model, x),
        _rules(
            tmp_path,
            """
        version: 1
        rules: [{name: classifier, match: head, tuner: head, settings: {num_classes: 5}}]
        """,
        ),
    )
    assert result.module(x).shape == (2, 5)
    assert result.summaries[0].added_parameters == 192 * 5 + 5 == result.trainable_parameters
    head = result.module.get_submodule("head")
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0  # a fresh head starts at zero
    logits = result.module(x)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3]), label_smoothing=0.1)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)  # closed form: uniform over 5 classes
    loss.backward()
    assert head.weight.grad.abs().sum() > 0  # and it learns from the first step


def test_a_head_rule_without_num_classes_keeps_the_trained_classifier(tmp_path):
    model, x = _model("vit")
    trained = model.head.weight.detach().clone()
    result = rewrite(
        trace(model, x),
        _rules(tmp_path, "version: 1\nrules: [{name: classifier, match: head, tuner: head}]\n"),
    )
    assert torch.equal(result.module.get_submodule("head").weight, trained) and trained.abs().sum() > 0
    assert result.module.get_submodule("head").weight.requires_grad


def test_refusals_are_clear(tmp_path):
    model, x = _model("swin")
    with pytest.raises(
        UtuneError,
        match=r"rule 'stage' .*region layers.1: parallel_adapter at parallel needs input "
        r"and output of one size but for the channels .*got 2x56x56x24 -> 2x28x28x48",
    ):
        rewrite(
            trace(model, x),
            _rules(tmp_path, "version: 1\nrules: [{name: stage, match: {scope: layers.1}, tuner: parallel_adapter}]\n"),
        )
    resnet, resnet_x = _model("resnet")
    with pytest.raises(
        UtuneError,
        match=r"rule 'prompts' \(.*rules.yaml:3:9\), region layer1.0: prompts join the "
        r"attention of a block; this region holds no attention",
    ):
        rewrite(
            trace(resnet, resnet_x),
            _rules(
                tmp_path,
                """
            version: 1
            rules: [{name: prompts, match: block, tuner: prompt}]
            """,
            ),
        )
    from toy_models import transformer_encoder

    for rule_file in ("prefix", "vpt_deep"):
        with pytest.raises(UtuneError, match=r"needs an attention whose queries, keys and values are visible"):
            encoder = trace(transformer_encoder().eval(), torch.randn(2, 5, 32), frontend="fx")  # MHA: one node
            rewrite(encoder, load_rules(RULES / f"{rule_file}.yaml"))
    model, x = _model("vit")
    gm = trace(model, x)
    rewrite(gm, load_rules(RULES / "utuner_ffn.yaml"))
    with pytest.raises(UtuneError, match=r"holds tuner nodes of rule 'ffn'; a tuner on another tuner is refused"):
        rewrite(
            gm,
            _rules(
                tmp_path, "version: 1\nrules: [{name: blocks, match: transformer_block, tuner: parallel_adapter}]\n"
            ),
        )


def test_train_key_selects_existing_parameters(tmp_path):
    model, x = _model("vit")
    result = rewrite(
        trace(model, x),
        _rules(
            tmp_path,
            """
        version: 1
        rules:
          - {name: mha, match: attention, tuner: parallel_adapter, train: [biases, "norm.*"]}
        """,
        ),
    )
    trainable = {n for n, p in result.module.named_parameters() if p.requires_grad}
    existing = trainable - {n for n in trainable if n.startswith("utune.")}
    assert existing == {"norm.weight", "norm.bias"} | {
        f"blocks.{i}.attn.{layer}.bias" for i in range(2) for layer in ("qkv", "proj")
    }
    with pytest.raises(UtuneError, match=r"train pattern 'nothing\.\*' names no parameter"):
        rewrite(
            trace(_model("vit")[0], x),
            _rules(
                tmp_path,
                """
            version: 1
            rules: [{name: mha, match: attention, tuner: parallel_adapter, train: ["nothing.*"]}]
            """,
            ),
        )


def test_several_rule_files_apply_in_order_and_may_overlap():
    model, x = _model("vit")
    with torch.no_grad():
        reference = model(x)
    result = rewrite(trace(model, x), [load_rules(RULES / "utuner_mha.yaml"), load_rules(RULES / "lora.yaml")])
    assert [(s.rule, s.regions) for s in result.summaries] == [
        ("mha", 2),
        ("classifier", 1),
        ("lora", 4),
        ("classifier", 1),
    ]
    with torch.no_grad():
        assert torch.equal(result.module(x), reference)
    _randomise(result.module)
    result.module(x).sum().backward()  # both tuners on the same attention receive gradients
    assert result.module.get_submodule("utune.mha.0").down.weight.grad is not None
    assert result.module.get_submodule("utune.lora.0").lora_A.weight.grad is not None


@pytest.mark.parametrize("written_out", [False, True])
def test_parallel_prefix_adds_attention_over_the_prefix(written_out):
    from test_opkinds import SdpaAttention, WrittenOutAttention

    module = (WrittenOutAttention if written_out else SdpaAttention)().eval()
    x = torch.randn(2, 5, 16)
    result = rewrite(trace(module, x), load_rules(RULES / "prefix_parallel.yaml"))
    prefix = result.module.get_submodule("utune.prefix.0")
    assert prefix.keys.shape == (2, 10, 8)  # [heads, length, head width]
    with torch.no_grad():
        prefix.values.normal_(0, 0.5)
        q, k, v = module.split(x)
        frozen = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        branch = torch.softmax(q @ prefix.keys.transpose(-2, -1) * 8**-0.5, dim=-1) @ prefix.values
        expected = module.proj(module.merge(frozen + branch))
        torch.testing.assert_close(result.module(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(result.module(x), module(x), atol=1e-3)


def test_tuners_start_from_the_seed_whatever_ran_before():
    model, x = _model("vit")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = rewrite(trace(model, x), load_rules(RULES / "dual_utuner.yaml")).module
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    torch.rand(1000)
    second = rewrite(trace(model, x), load_rules(RULES / "dual_utuner.yaml")).module
    other = rewrite(trace(model, x), load_rules(RULES / "dual_utuner.yaml"), seed=1).module
    tuners = [n for n, _ in first.named_parameters() if n.startswith("utune.") and n.endswith("down.weight")]
    assert tuners and all(torch.equal(first.get_parameter(n), second.get_parameter(n)) for n in tuners)
    assert not torch.equal(first.get_parameter(tuners[0]), other.get_parameter(tuners[0]))
