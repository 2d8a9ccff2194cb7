"""Prefixes and prompts (VPT): numerics against eager references that really
concatenate tokens (with every gate at 1, where the gated form is the classic
one), at gates away from 0 and 1, gradients at init, and dry-run sizes."""

import types
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from test_opkinds import SdpaAttention, WrittenOutAttention
from test_rewrite import _model, output_with
from toy_models import tiny_gpt

from utune_fx.match import load_rules
from utune_fx.match.report import match_report
from utune_fx.rewrite import rewrite
from utune_fx.trace import trace

RULES = Path(__file__).resolve().parents[1] / "rules"
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32


def _set(module, **values):
    with torch.no_grad():
        for name, value in values.items():
            parameter = module.get_parameter(name)
            parameter.copy_(value(parameter) if callable(value) else torch.full_like(parameter, value))


def _noise(scale):
    return lambda p: torch.randn_like(p) * scale


@pytest.mark.parametrize("model", [SdpaAttention, WrittenOutAttention])
def test_concatenated_prefix_joins_keys_and_values_behind_a_gate(model):
    torch.manual_seed(0)
    module, x = model().eval(), torch.randn(2, 5, 16)
    result = rewrite(trace(module, x), load_rules(RULES / "prefix.yaml"))
    with torch.no_grad():
        assert torch.equal(result.module(x), module(x))
    prefix = result.module.get_submodule("utune.prefix.0")
    assert prefix.keys.shape == prefix.values.shape == (2, 10, 8) and prefix.attend.gate.shape == (2, 1, 1)
    _set(prefix, values=_noise(1.0), **{"attend.gate": lambda g: torch.tensor([0.3, 1.0]).view_as(g)})
    with torch.no_grad():
        q, k, v = module.split(x)
        frozen = F.scaled_dot_product_attention(q, k, v)
        keys = torch.cat([k, prefix.keys.expand(2, -1, -1, -1)], dim=-2)
        values = torch.cat([v, prefix.values.expand(2, -1, -1, -1)], dim=-2)
        joined = F.scaled_dot_product_attention(q, keys, values)
        gate = prefix.attend.gate
        torch.testing.assert_close(
            result.module(x), module.proj(module.merge(frozen + gate * (joined - frozen))), **TOL
        )


def test_concatenated_prefix_keeps_a_causal_mask_on_the_real_keys():
    torch.manual_seed(0)
    model, idx = tiny_gpt().eval(), torch.randint(0, 50, (2, 7))
    result = rewrite(trace(model, idx), load_rules(RULES / "prefix.yaml"))
    with torch.no_grad():
        assert torch.equal(result.module(idx), model(idx))
    for i in range(2):
        _set(result.module, **{f"utune.prefix.{i}.attend.gate": 1.0, f"utune.prefix.{i}.values": _noise(1.0)})

    def attention(block, prefix):
        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([causal, torch.ones(T, 10, dtype=torch.bool)], dim=1)  # the prefix is open to all
            keys = torch.cat([k, prefix.keys.expand(B, -1, -1, -1)], dim=-2)
            values = torch.cat([v, prefix.values.expand(B, -1, -1, -1)], dim=-2)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

        block.attn.forward = types.MethodType(forward, block.attn)

    for i, block in enumerate(model.h):
        attention(block, result.module.get_submodule(f"utune.prefix.{i}"))
    with torch.no_grad():
        torch.testing.assert_close(result.module(idx), model(idx), **TOL)


def _vit_with_real_prompts(model, prompts, deep):
    """timm's ViT with prompt tokens really in the sequence (at its end: attention has no
    positional bias, so the place does not matter), dropped after the last block."""
    blocks, n = model.blocks, {}

    def insert(index):
        def hook(_, args):
            x = args[0]
            n.setdefault("tokens", x.shape[1])
            real = x[:, : n["tokens"]]
            if index == 0 or deep:
                return (torch.cat([real, prompts[index].expand(x.shape[0], -1, -1)], dim=1),)
            return None

        return hook

    handles = [b.register_forward_pre_hook(insert(i)) for i, b in enumerate(blocks) if i == 0 or deep]
    handles.append(blocks[-1].register_forward_hook(lambda _, __, out: out[:, : n["tokens"]]))
    return handles


@pytest.mark.parametrize("arch", ["vit", "deit"])
@pytest.mark.parametrize("deep", [False, True])
def test_prompts_equal_tokens_in_the_sequence_when_the_gates_are_open(arch, deep):
    model, x = _model(arch)
    result = rewrite(trace(model, x), load_rules(RULES / ("vpt_deep.yaml" if deep else "vpt_shallow.yaml")))
    blocks = len(model.blocks)
    _set(result.module, **{f"utune.prompts.{i}.attention0.gate": 1.0 for i in range(blocks)})
    prompts = [result.module.get_submodule(f"utune.prompts.{i}").tokens for i in range(blocks if deep else 1)]
    assert all(p.shape == (10, model.embed_dim) for p in prompts)
    expected = output_with(model, x, _vit_with_real_prompts(model, prompts, deep))
    with torch.no_grad():
        assert not torch.allclose(expected, model(x), atol=1e-4), "the prompts had no effect"
        torch.testing.assert_close(result.module(x), expected, **TOL)


def test_deep_prompts_on_swin_are_keys_of_every_window():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(2, 1, 1, 1), num_heads=(2, 1, 1, 1)
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    result = rewrite(trace(model, x), load_rules(RULES / "vpt_deep.yaml"))
    blocks = [b for layer in model.layers for b in layer.blocks]
    assert len(blocks) == 5 and any(any(b.shift_size) for b in blocks)  # a shifted window's mask is in play
    gates = [torch.rand(1) + 0.5 for _ in blocks]
    for i, gate in enumerate(gates):
        _set(result.module, **{f"utune.prompts.{i}.attention0.gate": lambda g, gate=gate: gate.expand_as(g)})

    def window_attention(block, tokens, gate):
        def forward(self, x, mask=None):
            B_, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            bias = self._get_rel_pos_bias()
            if mask is not None:
                bias = (bias + mask.unsqueeze(1).repeat(B_ // mask.shape[0], 1, 1, 1)).expand(B_, -1, -1, -1)
            frozen = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            _, k_p, v_p = (
                self.qkv(block.norm1(tokens))
                .reshape(1, -1, 3, self.num_heads, C // self.num_heads)
                .permute(2, 0, 3, 1, 4)
                .unbind(0)
            )
            open_ = torch.zeros(*bias.shape[:-1], k_p.shape[-2])
            joined = F.scaled_dot_product_attention(
                q,
                torch.cat([k, k_p.expand(B_, -1, -1, -1)], -2),
                torch.cat([v, v_p.expand(B_, -1, -1, -1)], -2),
                attn_mask=torch.cat([bias.expand(B_, -1, -1, -1), open_.expand(B_, -1, -1, -1)], -1),
            )
            y = frozen + gate * (joined - frozen)
            return self.proj(y.transpose(1, 2).reshape(B_, N, -1))

        block.attn.forward = types.MethodType(forward, block.attn)

    for i, (block, gate) in enumerate(zip(blocks, gates)):
        window_attention(block, result.module.get_submodule(f"utune.prompts.{i}").tokens, gate)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), **TOL)


@pytest.mark.parametrize("rule_file", ["prefix", "vpt_deep", "vpt_shallow"])
def test_gates_and_then_tokens_receive_gradients(rule_file):
    model, x = _model("vit")
    module = rewrite(trace(model, x), load_rules(RULES / f"{rule_file}.yaml")).module
    module(x).square().sum().backward()
    gates = [p for name, p in module.named_parameters() if name.endswith("gate")]
    tokens = [p for name, p in module.named_parameters() if name.startswith("utune.") and not name.endswith("gate")]
    assert gates and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)
    assert all(t.grad is None or t.grad.abs().sum() == 0 for t in tokens)  # 0 * (...) at init, as LoRA's A
    module.zero_grad()
    _set(module, **{name: 0.5 for name, _ in module.named_parameters() if name.endswith("gate")})
    module(x).square().sum().backward()
    assert all(t.grad.abs().sum() > 0 for t in tokens)


@pytest.mark.parametrize("rule_file", ["prefix", "prefix_parallel", "vpt_deep", "vpt_shallow"])
@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_the_dry_run_counts_what_the_rewrite_adds(rule_file, arch):
    model, x = _model(arch)
    rules = load_rules(RULES / f"{rule_file}.yaml")
    estimate = match_report(trace(model, x), model, rules, arch)["results"]
    result = rewrite(trace(model, x), rules)
    assert [e["added_parameters"] for e in estimate] == [s.added_parameters for s in result.summaries]


@pytest.mark.parametrize("arch", ["vit", "beit", "eva"])
def test_deep_prompt_keys_are_the_blocks_own_projection_without_position(arch):
    """K_p, V_p = split(qkv(norm1(P))): BEiT's q/v biases included, EVA's rotary embedding left out."""
    model, x = _model(arch)
    result = rewrite(trace(model, x), load_rules(RULES / "vpt_deep.yaml"))
    seen = {}
    gate = result.module.get_submodule("utune.prompts.1.attention0")
    handle = gate.register_forward_pre_hook(lambda _, args: seen.update(keys=args[5], values=args[6]))
    with torch.no_grad():
        result.module(x)
    handle.remove()
    block, tokens = model.blocks[1], result.module.get_submodule("utune.prompts.1").tokens
    attn = block.attn
    separate = getattr(attn, "q_bias", None) is not None
    bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if separate else attn.qkv.bias
    with torch.no_grad():
        qkv = F.linear(block.norm1(tokens), attn.qkv.weight, bias)
        _, keys, values = qkv.reshape(1, 10, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(seen["keys"], keys, **TOL)
    torch.testing.assert_close(seen["values"], values, **TOL)


@pytest.mark.parametrize("rule_file", ["prefix", "vpt_shallow", "vpt_deep"])
def test_token_tuner_artifacts_rebuild_with_their_saved_tokens(rule_file, tmp_path, capsys):
    import safetensors.torch

    from utune_fx.cli import main
    from utune_fx.rewrite.artifact import TENSORS, load_tuned

    out = tmp_path / "tuned"
    assert (
        main(
            [
                "rewrite",
                "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&depth=2",
                "--rules",
                str(RULES / f"{rule_file}.yaml"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "2 adapted operation(s)" in capsys.readouterr().out
    saved = safetensors.torch.load_file(str(out / TENSORS))
    torch.manual_seed(123)  # a different seed: what loads must be the saved tensors, not a new init
    loaded = dict(load_tuned(out).module.named_parameters())
    assert {name for name in saved if name.startswith("utune.")} and all(
        torch.equal(loaded[name], tensor) for name, tensor in saved.items()
    )


def test_shallow_prompts_on_a_written_out_causal_decoder_follow_its_computed_scale():
    """TinyGpt scales QK^T by 1 / sqrt(k.size(-1)), a value the graph computes: the prompts'
    own attention and the gate's must use it (gates at 1: the prompts really in the sequence)."""
    torch.manual_seed(0)
    model, idx = tiny_gpt().eval(), torch.randint(0, 50, (2, 7))
    result = rewrite(trace(model, idx), load_rules(RULES / "vpt_shallow.yaml"))
    with torch.no_grad():
        assert torch.equal(result.module(idx), model(idx))
    _set(result.module, **{f"utune.prompts.{i}.attention0.gate": 1.0 for i in range(2)})
    tokens = result.module.get_submodule("utune.prompts.0").tokens

    def attention(self, x):  # real tokens causal among themselves, prompts visible to all; prompts see all
        B, T, C = x.shape
        q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        real = T - 10
        mask = torch.ones(T, T, dtype=torch.bool)
        mask[:real, :real] = torch.ones(real, real, dtype=torch.bool).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    for block in model.h:
        block.attn.forward = types.MethodType(attention, block.attn)
    handles = [
        model.h[0].register_forward_pre_hook(
            lambda _, args: (torch.cat([args[0], tokens.expand(args[0].shape[0], -1, -1)], dim=1),)
        ),
        model.h[-1].register_forward_hook(lambda _, __, out: out[:, :7]),
    ]
    torch.testing.assert_close(result.module(idx).detach(), output_with(model, idx, handles), **TOL)


def _vpt_swin_block(block, x, prompts):
    """VPT's Swin variant, written out: every window attends to [its tokens; the prompts] (the prompts
    without relative position bias or shift mask); the prompts attend within every window too, and
    their outputs are averaged over the windows."""
    from timm.models.swin_transformer import window_partition, window_reverse

    B, H, W, C = x.shape
    attn, shift, size = block.attn, block.shift_size, block.window_size
    normed = block.norm1(x)
    shifted = torch.roll(normed, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else normed
    windows = window_partition(shifted, size).reshape(-1, size[0] * size[1], C)
    q, k, v = attn.qkv(windows).reshape(*windows.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    per_window = windows.shape[0] // B
    q_p, k_p, v_p = (
        t.repeat_interleave(per_window, 0)
        for t in attn.qkv(block.norm1(prompts))
        .reshape(B, prompts.shape[1], 3, attn.num_heads, -1)
        .permute(2, 0, 3, 1, 4)
        .unbind(0)
    )
    keys, values = torch.cat([k, k_p], -2), torch.cat([v, v_p], -2)
    bias = attn._get_rel_pos_bias().expand(q.shape[0], -1, -1, -1)
    if block.attn_mask is not None:
        bias = bias + block.attn_mask.unsqueeze(1).repeat(B, 1, 1, 1)
    bias = torch.cat([bias, torch.zeros(*bias.shape[:-1], prompts.shape[1])], dim=-1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias).transpose(1, 2).reshape(*windows.shape)
    out = window_reverse(attn.proj(out).view(-1, *size, C), size, H, W)
    x = x + (torch.roll(out, shifts=shift, dims=(1, 2)) if any(shift) else out)
    x = x.reshape(B, -1, C)
    x = (x + block.mlp(block.norm2(x))).reshape(B, H, W, C)
    prompt_out = F.scaled_dot_product_attention(q_p, keys, values).unflatten(0, (B, per_window)).mean(1)
    prompts = prompts + attn.proj(prompt_out.transpose(1, 2).reshape(*prompts.shape))
    return x, prompts + block.mlp(block.norm2(prompts))


def test_shallow_prompts_on_swin_follow_vpts_swin_variant():
    """Prompts join every window, are averaged over windows, and cross patch merging as
    four copies side by side, as VPT's Swin code does; checked with every gate at 1."""
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(2, 1, 1, 1), num_heads=(2, 1, 1, 2)
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    result = rewrite(trace(model, x), load_rules(RULES / "vpt_shallow.yaml"))
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
    _set(result.module, **{f"utune.prompts.{i}.attention0.gate": 1.0 for i in range(5)})
    with torch.no_grad():
        tokens, prompts = model.patch_embed(x), result.module.get_submodule("utune.prompts.0").tokens.expand(2, -1, -1)
        for stage in model.layers:
            if not isinstance(stage.downsample, torch.nn.Identity):
                tokens = stage.downsample(tokens)
                prompts = stage.downsample.reduction(stage.downsample.norm(prompts.repeat(1, 1, 4)))
            for block in stage.blocks:
                tokens, prompts = _vpt_swin_block(block, tokens, prompts)
        expected = model.forward_head(model.norm(tokens))
        assert not torch.allclose(expected, model(x), atol=1e-4)
        torch.testing.assert_close(result.module(x), expected, **TOL)


@pytest.mark.parametrize("parallel", [True, False])
def test_reparameterised_prefixes_start_as_the_frozen_model_and_train(parallel, tmp_path):
    model, x = _model("vit")
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\nrules: [{name: prefix, match: attention, tuner: prefix, "
        f"settings: {{length: 4, reparam_hidden: 16, parallel: {str(parallel).lower()}}}}}]\n"
    )
    result = rewrite(trace(model, x), load_rules(path))
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
    prefix = result.module.get_submodule("utune.prefix.0")
    assert prefix.embedding.shape == (4, model.embed_dim) and prefix.reparam[0].out_features == 16
    _set(result.module, **{name: _noise(0.3) for name, p in result.module.named_parameters() if p.requires_grad})
    result.module(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())
