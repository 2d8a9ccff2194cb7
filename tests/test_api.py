"""utune_fx.tune and friends on Hugging Face language models and timm: the tuned model stays the user's.

Truth from outside the code: the frozen model's own generate() and logits (a deep copy taken before
tuning), Hugging Face Trainer and from_pretrained, PEFT's LoRA on the same tensors, and an eager
formula written from the model's own modules.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import utune_fx
from utune_fx.errors import UtuneError
from utune_fx.rulefiles import shipped_rule_names

transformers = pytest.importorskip("transformers")

VOCAB = 300
LENGTHS = (7, 16, 33)
TOL = {"atol": 2e-5, "rtol": 1e-4}  # float32: one model against the same computation reordered


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


CAUSAL = {"gpt2": _gpt2, "llama": _llama}


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, length: int, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(3, length, seed)).logits


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, length: int = 16, count: int = 24):
        self.ids = _ids(count, length, seed=11)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _trainer_steps(model, tmp_path, steps: int = 3) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train()
    model.eval()


@pytest.mark.parametrize("rules", ["lora", "dual_utuner"])
@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_a_tuned_causal_lm_is_the_same_model_and_generates_the_frozen_tokens(name, rules):
    torch.manual_seed(0)
    model = CAUSAL[name]().eval()
    frozen = copy.deepcopy(model)
    tuned = utune_fx.tune(model, rules)
    assert tuned is model and type(tuned) is type(frozen)
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if not n.startswith("utune."))
    trainable, total = utune_fx.trainable_parameters(tuned)
    assert 0 < trainable < total // 10  # the token head and embedding stay frozen
    for length in LENGTHS:
        prompt = _ids(2, length, seed=length)
        expected = frozen.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(tuned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), expected)
    # keyword inputs and the loss: the class's own forward
    ids = _ids(2, 9, seed=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = tuned(input_ids=ids, attention_mask=mask, labels=ids)
        theirs = frozen(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(ours.loss, theirs.loss)


def _move_off_identity(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("utune."):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def _tuned_with_base(name: str, rules: str):
    """A freshly built model, tuned, and a copy of its frozen weights (to build the same base again)."""
    torch.manual_seed(0)
    model = CAUSAL[name]()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    return utune_fx.tune(model, rules), base_state


def _base(name: str, state: dict):
    model = CAUSAL[name]()
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_lora_trains_with_trainer_saves_loads_folds_and_reloads_with_from_pretrained(name, tmp_path):
    tuned, base_state = _tuned_with_base(name, "lora")
    before = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}
    _trainer_steps(tuned, tmp_path)
    moved = [n for n, p in tuned.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(".lora_B." in n for n in moved)  # B left zero: the tuned model now differs from the frozen one
    expected = {length: _logits(tuned, length) for length in LENGTHS}

    utune_fx.save_tuners(tuned, tmp_path / "tuners")
    loaded = utune_fx.load_tuners(_base(name, base_state), tmp_path / "tuners").eval()
    for length in LENGTHS:
        assert torch.equal(_logits(loaded, length), expected[length])

    folded = utune_fx.fold(tuned)
    assert folded is tuned and not hasattr(folded, "utune")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules())
    assert set(folded.state_dict()) == set(base_state)
    folded.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(reloaded) is type(folded)
    for length in LENGTHS:
        torch.testing.assert_close(_logits(reloaded, length), expected[length], **TOL)
    assert not torch.allclose(expected[16], _frozen_logits(base_state, name, 16), **TOL)  # the fold carried something


def _frozen_logits(state: dict, name: str, length: int) -> torch.Tensor:
    return _logits(_base(name, state).eval(), length)


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_the_dual_u_tuner_trains_saves_and_loads_and_fold_refuses_it_with_the_reason(name, tmp_path):
    tuned, base_state = _tuned_with_base(name, "dual_utuner")
    _trainer_steps(tuned, tmp_path)
    expected = _logits(tuned, 16)
    assert not torch.allclose(expected, _frozen_logits(base_state, name, 16))
    utune_fx.save_tuners(tuned, tmp_path / "tuners")
    assert torch.equal(_logits(utune_fx.load_tuners(_base(name, base_state), tmp_path / "tuners").eval(), 16), expected)
    with pytest.raises(UtuneError, match="cannot fold rule 'mha' .*ReLU makes U\\(x\\) nonlinear"):
        utune_fx.fold(tuned)
    assert torch.equal(_logits(tuned, 16), expected)  # refused before anything was written: still tuned


def test_gpt2_lora_matches_peft_on_the_same_tensors():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _gpt2().eval()
    reference = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.attn\.(c_attn|c_proj)", fan_in_fan_out=True),
    ).eval()
    tuned = utune_fx.tune(model, "lora")
    _move_off_identity(tuned)
    ours = dict(tuned.named_parameters())
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if ".lora_" not in name:
                continue
            layer = name.split("base_model.model.")[1].split(".lora_")[0]
            splice = next(s for s in tuned._utune_state.splices if s.writes.module == layer)
            part = "lora_A" if ".lora_A." in name else "lora_B"
            parameter.copy_(ours[f"{splice.tuner}.{part}.weight"])
    for length in LENGTHS:
        torch.testing.assert_close(_logits(tuned, length), _logits(reference, length), **TOL)


def test_a_bert_classifier_tunes_trains_and_folds_without_wrappers():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config)
    tuned = utune_fx.tune(model, "lora")
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable  # the head rule trains the classifier
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = _ids(8, 12, seed=2), torch.arange(8) % 3
    losses = []
    tuned.train()
    for _ in range(5):
        loss = tuned(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    tuned.eval()
    ids = _ids(4, 21, seed=3)  # another length than the traced one
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
        folded = utune_fx.fold(tuned)
        torch.testing.assert_close(folded(input_ids=ids).logits, expected, **TOL)
    assert type(folded) is transformers.BertForSequenceClassification


def test_a_t5_tunes_trains_folds_and_reloads_without_wrappers(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    model = transformers.T5ForConditionalGeneration(config)
    frozen = copy.deepcopy(model).eval()
    tuned = utune_fx.tune(model, "lora")
    prompt = _ids(2, 11, seed=4)
    assert torch.equal(
        tuned.eval().generate(prompt, max_new_tokens=5, do_sample=False),
        frozen.generate(prompt, max_new_tokens=5, do_sample=False),
    )
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for _ in range(3):
        loss = tuned(input_ids=_ids(4, 12, seed=5), labels=_ids(4, 6, seed=6)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned.eval()
    ids, decoder = _ids(2, 17, seed=7), _ids(2, 9, seed=8)
    with torch.no_grad():
        expected = tuned(input_ids=ids, decoder_input_ids=decoder).logits
        assert not torch.allclose(expected, frozen(input_ids=ids, decoder_input_ids=decoder).logits)
    utune_fx.fold(tuned).save_pretrained(tmp_path / "t5")
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, decoder_input_ids=decoder).logits, expected, **TOL)


# -- timm: every shipped rule file ---------------------------------------------------------------

GRAPH_ONLY = {
    "prefix",
    "prefix_parallel",
    "vpt_deep",
    "vpt_shallow",
    "res_tuning_bypass",
}  # inside attention, prompts, side ladder


def _vit():
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5
    ).eval()


@pytest.mark.parametrize("rules", shipped_rule_names())
def test_every_shipped_rule_file_tunes_a_timm_vit_in_place_or_says_why_not(rules):
    from utune_fx.match import load_rules
    from utune_fx.rewrite import rewrite
    from utune_fx.trace import trace

    images = torch.randn(2, 3, 32, 32)
    model = _vit()
    expected_trainable = rewrite(trace(_vit(), images), load_rules(rules)).trainable_parameters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = utune_fx.tune(model, rules, images)
    if rules in GRAPH_ONLY:
        assert tuned is not model and any("need the whole-model graph" in str(w.message) for w in caught)
    else:
        assert tuned is model and not any("utune" in str(w.message) for w in caught)
    assert utune_fx.trainable_parameters(tuned)[0] == expected_trainable
    with torch.no_grad():
        assert tuned(torch.randn(3, 3, 32, 32)).shape == (3, 5)


def test_block_tuners_read_what_the_block_reads_after_the_previous_blocks_tuner():
    """Eager truth from the ViT's own modules: x_{i+1} = block_i(x_i) + U_i(x_i)."""
    model, images = _vit(), torch.randn(2, 3, 32, 32)
    frozen = copy.deepcopy(model)
    tuned = utune_fx.tune(model, "utuner_block", images)
    _move_off_identity(tuned)
    with torch.no_grad():
        x = frozen.norm_pre(frozen._pos_embed(frozen.patch_embed(images)))
        for index, block in enumerate(frozen.blocks):
            x = block(x) + tuned.get_submodule(f"utune.block.{index}")(x)
        expected = frozen.forward_head(frozen.norm(x))
        torch.testing.assert_close(tuned(images), expected, **TOL)


def test_refusals_are_one_line():
    model = _gpt2()
    utune_fx.tune(model, "lora")
    with pytest.raises(UtuneError, match="is tuned already"):
        utune_fx.tune(model, "lora")
    with pytest.raises(UtuneError, match="has no tuners; call utune_fx.tune"):
        utune_fx.fold(_gpt2())
    with pytest.raises(UtuneError, match="cannot make example inputs"):
        utune_fx.tune(torch.nn.Linear(3, 3), "lora")
    with pytest.raises(UtuneError, match="Sequential at the top: its forward runs every child"):
        utune_fx.tune(torch.nn.Sequential(torch.nn.Linear(3, 3)), "lora", torch.randn(2, 3))
    with pytest.raises(UtuneError, match="example_inputs names"):
        utune_fx.tune(_gpt2(), "lora", {"attention_mask": torch.ones(2, 8, dtype=torch.long)})


def test_load_tuners_refuses_tuners_of_other_rules(tmp_path):
    torch.manual_seed(0)
    model = _gpt2()
    state = copy.deepcopy(model.state_dict())
    utune_fx.save_tuners(utune_fx.tune(model, "lora"), tmp_path / "lora")
    other = _gpt2()
    other.load_state_dict(state)
    utune_fx.tune(other, "dual_utuner")
    with pytest.raises(UtuneError, match="made with other rules"):
        utune_fx.load_tuners(other, tmp_path / "lora")


def test_tuners_move_between_the_command_line_and_the_python_api(tmp_path):
    from utune_fx.cli import main
    from utune_fx.specs import load_model

    spec = "hf:gpt2/causal-lm?n_layer=2&n_embd=64&n_head=4"
    assert main(["rewrite", spec, "--rules", "lora", "-o", str(tmp_path / "cli")]) == 0
    model = utune_fx.load_tuners(load_model(spec).model, tmp_path / "cli")
    assert [s.tuner for s in model._utune_state.splices] == [f"utune.lora.{i}" for i in range(4)]
    _move_off_identity(model)
    utune_fx.save_tuners(model, tmp_path / "api")
    assert main(["fold", str(tmp_path / "api"), "--model", spec, "-o", str(tmp_path / "folded")]) == 0
    from utune_fx.fold.artifact import load_folded

    _, folded = load_folded(tmp_path / "folded", model=spec)
    ids = _ids(2, 8, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(folded.module(ids).logits, model.eval()(ids).logits, **TOL)


def test_a_tuned_model_deep_copies_and_pickles_and_folds_after_unpickling(tmp_path):
    torch.manual_seed(0)
    model = utune_fx.tune(_llama(), "lora")
    _move_off_identity(model)
    expected = _logits(model.eval(), 12)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.get_parameter("utune.lora.0.lora_B.weight").add_(1.0)
    assert torch.equal(_logits(model, 12), expected)  # the copy's hooks call the copy's tuners
    assert not torch.allclose(_logits(twin, 12), expected)
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(_logits(restored, 12), expected)
    folded = utune_fx.fold(restored)  # the graph is traced and rewritten again, with the trained tuners
    assert not hasattr(folded, "utune")
    torch.testing.assert_close(_logits(folded, 12), expected, **TOL)


def test_a_tuned_token_model_exports_with_dynamic_batch_and_sequence_axes(tmp_path):
    import onnx
    import onnxruntime

    from utune_fx.export import export_onnx

    torch.manual_seed(0)
    model = utune_fx.tune(_gpt2(), "dual_utuner")
    _move_off_identity(model)
    model.eval()
    result = export_onnx(model, (_ids(2, 8, seed=1),), tmp_path / "gpt2.onnx")
    lengths = {length for check in result.parity.checks for length in check.sequence_lengths}
    assert len(lengths) >= 2 and all(check.passed for check in result.parity.checks)
    (ids_input,) = onnx.load(str(tmp_path / "gpt2.onnx")).graph.input
    assert all(dim.dim_param for dim in ids_input.type.tensor_type.shape.dim)  # batch and sequence symbolic
    session = onnxruntime.InferenceSession(str(tmp_path / "gpt2.onnx"), providers=["CPUExecutionProvider"])
    ids = _ids(3, 21, seed=2)  # neither length the export verified
    (logits, *_) = session.run(None, {ids_input.name: ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), _logits_of(model, ids), **TOL)


def _logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_model_in_training_mode_is_tuned_in_place_and_its_batch_norm_statistics_stay():
    import timm

    model = timm.create_model("resnet18", num_classes=3)  # timm returns it in training mode
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    tuned = utune_fx.tune(model, "lora", torch.randn(2, 3, 32, 32))
    assert tuned is model and model.training and all(m.training for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())
    block_convs = [n for n, m in model.named_modules() if n.startswith("layer") and isinstance(m, torch.nn.Conv2d)]
    assert sorted(s.writes.module for s in model._utune_state.splices) == sorted(block_convs)  # 16 + 3 shortcuts


@pytest.mark.parametrize("cross", ["tuner", "writes"])
def test_a_wrong_splice_is_caught_by_the_check_against_the_graph_and_leaves_no_hook(monkeypatch, cross):
    """q_proj's and o_proj's LoRA (same sizes) swapped: wrong values ('tuner'), or a tuner that reads
    a module which has not run yet ('writes'); either is one UtuneError and no hook stays."""
    import dataclasses

    from utune_fx import api

    real_plan = api.splice_plan

    def crossed(gm, model, inputs):
        splices, refused = real_plan(gm, model, inputs)
        q, o = splices[0], splices[3]
        assert q.writes.module.endswith("q_proj") and o.writes.module.endswith("o_proj")
        swap = {cross: getattr(o, cross)}, {cross: getattr(q, cross)}
        splices[0], splices[3] = dataclasses.replace(q, **swap[0]), dataclasses.replace(o, **swap[1])
        return splices, refused

    monkeypatch.setattr(api, "splice_plan", crossed)
    model = _llama()
    with pytest.raises(UtuneError, match="do not compute what the rewritten graph computes"):
        utune_fx.tune(model, "lora")
    assert not hasattr(model, "utune") and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
