import json
import logging

import pytest
from helpers import error_line, run_cli

from cockatoo_lib.plan.catalogue import CATALOGUE, resolve_plan
from cockatoo_lib.tokenize import load_tokenized, tokenize


@pytest.fixture
def plan(tiny_models):
    return resolve_plan("deberta", {"base_model": str(tiny_models["deberta"])})


def test_tokenized_splits_are_unpadded_and_truncated_at_max_length(small_data, plan, tmp_path):
    short = plan.model_copy(update={"max_length": 12})
    info = tokenize(small_data, short, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    datasets, saved = load_tokenized(tmp_path / "tok")
    assert saved == info
    train = datasets["train"]
    assert set(train.column_names) >= {"input_ids", "attention_mask", "labels", "label_mask", "length"}
    lengths = [len(ids) for ids in train["input_ids"]]
    assert max(lengths) == 12 and min(lengths) < 12  # no padding to max length
    assert lengths == train["length"]
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = pq.read_table(small_data / "train.parquet")["text"].to_pylist()
    full = AutoTokenizer.from_pretrained(plan.base_model)(texts)["input_ids"]
    assert info["truncated"]["train"] == sum(len(ids) > 12 for ids in full) > 0
    manifest = json.loads((small_data / "manifest.json").read_text())
    assert info["rows"] == {s: v["rows"] for s, v in manifest["splits"].items()}


def test_second_run_is_a_cache_hit_and_other_settings_get_their_own_entry(
        small_data, plan, tmp_path, caplog, monkeypatch):
    cache = str(tmp_path / "cache")
    first = tokenize(small_data, plan, tmp_path / "a", cache_root=cache)
    assert not first["cache_hit"]

    import cockatoo_lib.tokenize as tok

    def fail(*_a, **_k):
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(tok, "_tokenize_split", fail)
    with caplog.at_level(logging.INFO):
        second = tokenize(small_data, plan, tmp_path / "b", cache_root=cache)
    assert second["cache_hit"] and second["cache_key"] == first["cache_key"]
    assert "cache hit" in caplog.text
    a, _ = load_tokenized(tmp_path / "a")
    b, _ = load_tokenized(tmp_path / "b")
    assert a["train"]["input_ids"] == b["train"]["input_ids"]
    monkeypatch.undo()

    longer = tokenize(small_data, plan.model_copy(update={"max_length": 64}), tmp_path / "c",
                      cache_root=cache)
    minilm = tokenize(small_data, resolve_plan("minilm"), tmp_path / "d", cache_root=cache)
    keys = {first["cache_key"], longer["cache_key"], minilm["cache_key"]}
    assert len(keys) == 3 and not longer["cache_hit"] and not minilm["cache_hit"]
    assert sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir()) == sorted(keys)


def test_cache_root_can_be_any_fsspec_filesystem(small_data, plan, tmp_path):
    root = "memory://cockatoo-test-cache"
    assert not tokenize(small_data, plan, tmp_path / "a", cache_root=root)["cache_hit"]
    assert tokenize(small_data, plan, tmp_path / "b", cache_root=root)["cache_hit"]


@pytest.mark.parametrize("args, message", [
    (["--model-type", "bert"], f"unknown model type 'bert'; valid: {', '.join(CATALOGUE)}"),
    (["--model-type", "minilm", "--set", "max_lenght=64"], "unknown plan setting 'max_lenght'"),
])
def test_bad_model_settings_fail_before_any_work(args, message, small_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tok"
    code, _, err = run_cli(["tokenize", "--data", small_data, "--output", out, *args],
                           capsys, monkeypatch)
    assert code == 2 and message in error_line(err)
    assert not out.exists()


def test_cache_entry_is_a_complete_tokenized_folder(small_data, plan, tmp_path):
    """The pipeline hands train the cache entry itself, so it must stand alone."""
    info = tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    assert info["cache_uri"].startswith(f"file://{tmp_path}/cache/tokenized/{info['cache_key']}/data-")
    datasets, entry_info = load_tokenized(info["cache_uri"].removeprefix("file://"))
    assert len(datasets["train"]) == info["rows"]["train"]
    assert entry_info["class_weights"] and entry_info["labels"] == info["labels"]
    assert entry_info["data_fingerprint"] == info["data_fingerprint"]


def test_the_tokenizer_extension_adds_nothing_where_nothing_is_unknown(small_data, plan, tmp_path):
    on = tokenize(small_data, plan, tmp_path / "on", cache_root=str(tmp_path / "cache"))
    tokenize(small_data, plan.model_copy(update={"tokenizer_extension": "off"}), tmp_path / "off",
             cache_root=str(tmp_path / "cache"))
    assert on["diagnostics"]["overall"]["unknown_token_share"] < 0.05 and "tokenizer_extension" not in on
    a, _ = load_tokenized(tmp_path / "on")
    b, _ = load_tokenized(tmp_path / "off")
    assert all(a[s]["input_ids"] == b[s]["input_ids"] for s in ("train", "validation", "test"))


EMOJI = ["🤡", "💀", "🔥", "😂", "👉", "✨"]


@pytest.fixture
def noisy_data(tmp_path):
    """Posts whose emoji the tiny tokenizer has never seen: a third of their tokens are unknown."""
    import pandas as pd
    from helpers import write_config

    from cockatoo_lib.data.prepare import load_data_config, prepare

    def text(i):  # letters the tiny tokenizer knows, then the emoji
        emoji = " ".join(EMOJI[(i + k) % len(EMOJI)] * (1 + k % 2) for k in range(3))
        words = " you idiot" if i % 2 else " nice day"
        return f"post {'abcdefghij'[i % 10]}{'klmnoprst'[i // 10 % 9]} {emoji}{words}"

    rows = [{"text": text(i), "toxic": i % 2} for i in range(120)]
    pd.DataFrame(rows).to_csv(tmp_path / "posts.csv", index=False)
    config = write_config(tmp_path, [{"name": "posts", "path": "posts.csv", "labels": {"toxicity": "toxic"}}],
                          labels=["toxicity"])
    prepare(load_data_config(str(config)), tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.slow
def test_characters_the_tokenizer_drops_are_added_trained_saved_and_read_back(noisy_data, plan, tmp_path):
    import numpy as np

    from cockatoo_lib.evaluation.metrics import macro_f1, sigmoid
    from cockatoo_lib.release.predict import Classifier
    from cockatoo_lib.training.collate import PaddingCollator
    from cockatoo_lib.training.models import load_trained_model, predict_logits
    from cockatoo_lib.training.trainer import train

    info = tokenize(noisy_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    extension = info["tokenizer_extension"]
    assert sorted(extension["added_tokens"]) == sorted(EMOJI)
    assert extension["diagnostics_before"]["sources"]["posts"]["unknown_token_share"] > 0.2
    assert info["diagnostics"]["sources"]["posts"]["unknown_token_share"] == 0
    off = tokenize(noisy_data, plan.model_copy(update={"tokenizer_extension": "off"}), tmp_path / "off",
                   cache_root=str(tmp_path / "cache"))
    assert off["cache_key"] != info["cache_key"] and "tokenizer_extension" not in off
    again = tokenize(noisy_data, plan, tmp_path / "again", cache_root=str(tmp_path / "cache"))
    assert again["cache_hit"] and again["tokenizer_extension"] == extension  # deterministic, cached

    fast = plan.model_copy(update={"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1,
                                   "learning_rate": 1e-3, "dataloader_num_workers": 0})
    manifest = train(tmp_path / "tok", fast, tmp_path / "model", data_dir=noisy_data)
    # Saved and loaded, the extended model scores validation as it did before saving.
    datasets, _ = load_tokenized(tmp_path / "tok")
    val = datasets["validation"]
    model = load_trained_model(tmp_path / "model", "sequence-classification")
    logits = predict_logits(model, [PaddingCollator(0)([val[i] for i in range(len(val))])])
    y, m = np.asarray(val["labels"]), np.asarray(val["label_mask"])
    assert macro_f1(sigmoid(logits.numpy()), y, m, list(manifest["thresholds"].values())) == pytest.approx(
        manifest["validation_macro_f1_tuned"])
    # What predicts and serves reads the emoji as the tokens training saw.
    classifier = Classifier(tmp_path / "model", device="cpu")
    ids = classifier.tokenizer("🤡 post", add_special_tokens=False)["input_ids"]
    assert classifier.tokenizer.unk_token_id not in ids
    assert classifier.predict_proba(["🤡 post"]).shape == (1, 1)
