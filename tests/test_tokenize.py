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
