import json
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import error_line, run_cli, write_config

from cockatoo_lib.data import load_data_config, prepare, split_indices


def _read(folder, split="train"):
    return pq.read_table(folder / f"{split}.parquet").to_pandas()


def _all_rows(folder):
    return pd.concat([_read(folder, s) for s in ("train", "validation", "test")], ignore_index=True)


def test_sample_preset_masks_what_a_source_does_not_annotate(sample_data):
    manifest = json.loads((sample_data / "manifest.json").read_text())
    labels = manifest["labels"]
    assert labels == ["scam", "violence", "harassment", "hate_speech", "toxicity", "obscenity",
                      "jailbreaking"]
    rows = _all_rows(sample_data)
    assert set(rows.columns) == {"text", "labels", "label_mask", "source"}
    mask = {src: np.stack(g["label_mask"].to_numpy()) for src, g in rows.groupby("source")}
    # phishing annotates scam only; toxicchat toxicity and jailbreaking; jigsaw five labels.
    assert (mask["phishing"] == [1, 0, 0, 0, 0, 0, 0]).all()
    assert (mask["toxicchat"] == [0, 0, 0, 0, 1, 0, 1]).all()
    assert (mask["jigsaw"] == [0, 1, 1, 1, 1, 1, 0]).all()
    counts = {s: v["rows"] for s, v in manifest["splits"].items()}
    assert sum(counts.values()) == len(rows)
    assert counts["validation"] == pytest.approx(0.1 * len(rows), abs=8)
    assert counts["test"] == pytest.approx(0.1 * len(rows), abs=8)
    train = _read(sample_data)
    y, m = np.stack(train["labels"].to_numpy()), np.stack(train["label_mask"].to_numpy())
    assert manifest["splits"]["train"]["positives"] == dict(zip(labels, (y * m).sum(0).tolist()))
    assert len(manifest["fingerprint"]) == 64
    assert all(0 < w <= 10 for w in manifest["class_weights"].values())


def test_same_inputs_and_seed_give_byte_identical_splits(tmp_path):
    config = load_data_config("sample")
    prepare(config, tmp_path / "a", seed=7)
    prepare(config, tmp_path / "b", seed=7)
    prepare(config, tmp_path / "c", seed=8)
    for split in ("train", "validation", "test"):
        a = (tmp_path / "a" / f"{split}.parquet").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.parquet").read_bytes()
        assert a != (tmp_path / "c" / f"{split}.parquet").read_bytes()


def test_split_is_stratified_on_label_combinations():
    rng = np.random.default_rng(0)
    y = (rng.random((5000, 3)) < [0.05, 0.3, 0.5]).astype(np.int8)
    m = np.ones_like(y)
    parts = split_indices(y, m, seed=1, val_frac=0.1, test_frac=0.1)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(5000))
    for split, frac in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        share = y[parts[split]].mean(0)
        assert np.allclose(share, y.mean(0), atol=0.01), (split, share)
        assert len(parts[split]) == pytest.approx(5000 * frac, abs=10)


def test_mapping_kinds_threshold_merge_and_missing_values(tmp_path):
    pd.DataFrame({
        "body": ["a", "b", "c", "d"],
        "flag": [True, False, True, False],
        "score": [0.2, 0.7, 0.5, None],
        "x": [1, 0, 0, 1], "z": [0, 0, 1, 1],
        "s1": [0.9, 0.1, 0.3, 0.6], "s2": [0.0, 0.1, 0.3, 0.6],
    }).to_parquet(tmp_path / "d.parquet")
    config = write_config(tmp_path, [{
        "name": "d", "path": "d.parquet", "text_column": "body",
        "labels": {
            "scam": "flag",
            "toxicity": {"column": "score", "threshold": 0.6},
            "violence": {"columns": ["x", "z"], "merge": "or"},
            "harassment": {"columns": ["x", "z"], "merge": "and"},
            "obscenity": {"columns": ["s1", "s2"], "merge": "mean"},
            "hate_speech": {"columns": ["s1", "s2"], "merge": "max"},
        }}], labels=["scam", "toxicity", "violence", "harassment", "obscenity", "hate_speech"])
    prepare(load_data_config(str(config)), tmp_path / "out", max_samples=0)
    rows = _all_rows(tmp_path / "out").set_index("text").sort_index()
    y = np.stack(rows["labels"].to_numpy())
    m = np.stack(rows["label_mask"].to_numpy())
    assert y.tolist() == [
        [1, 0, 1, 0, 0, 1],  # a: flag, score 0.2, x only, s mean 0.45, s max 0.9
        [0, 1, 0, 0, 0, 0],  # b
        [1, 0, 1, 0, 0, 0],  # c: score 0.5 < 0.6
        [0, 0, 1, 1, 1, 1],  # d
    ]
    # A missing score leaves that row's label unannotated.
    assert m[:, 1].tolist() == [1, 1, 1, 0]


def test_cleaning_strips_drops_empty_and_duplicates(tmp_path):
    pd.DataFrame({"text": ["  hello  ", "hello", "", "   ", None, "bye"],
                  "label": [1, 0, 1, 1, 0, 0]}).to_csv(tmp_path / "d.csv", index=False)
    config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "labels": {"scam": "label"}}])
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    rows = _all_rows(tmp_path / "out")
    assert sorted(rows["text"]) == ["bye", "hello"]
    assert rows.set_index("text").loc["hello", "labels"][0] == 1  # the first copy is kept
    stats = manifest["sources"]["d"]
    assert (stats["empty_rows_dropped"], stats["duplicates_dropped"], stats["rows_kept"]) == (3, 1, 2)


def test_label_without_positives_in_train_is_a_warning(tmp_path, caplog):
    pd.DataFrame({"text": [f"t{i}" for i in range(30)], "s": [0] * 30, "v": [i % 2 for i in range(30)]}
                 ).to_csv(tmp_path / "d.csv", index=False)
    config = write_config(tmp_path, [{"name": "d", "path": "d.csv",
                                      "labels": {"scam": "s", "violence": "v"}}],
                          labels=["scam", "violence"])
    with caplog.at_level(logging.WARNING):
        manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    assert "active label scam has no positive example in train" in caplog.text
    assert manifest["warnings"] == ["active label scam has no positive example in train"]


# ---------------------------------------------------------------- bad input: one line, exit 2


def _csv(tmp_path, frame, name="d.csv"):
    frame.to_csv(tmp_path / name, index=False)
    return name


BAD_INPUTS = {
    "missing file": (lambda p: "nothere.csv", {"scam": "label"}, "not found: .*nothere.csv"),
    "unknown suffix": (lambda p: (p / "d.txt").write_text("text,label\na,1\n") and "d.txt",
                       {"scam": "label"}, r"cannot tell the format of .*d\.txt"),
    "text column missing": (lambda p: _csv(p, pd.DataFrame({"body": ["a"], "label": [1]})),
                            {"scam": "label"}, "text column 'text' not found; columns: body, label"),
    "label column missing": (lambda p: _csv(p, pd.DataFrame({"text": ["a"], "lbl": [1]})),
                             {"scam": "label"}, "label column 'label' for scam not found"),
    "yes in a binary column": (lambda p: _csv(p, pd.DataFrame({"text": ["a", "b"], "label": [0, "yes"]})),
                               {"scam": "label"},
                               r"column 'label' holds 'yes' \(data row 2\); expected bool"),
    "2 in a binary column": (lambda p: _csv(p, pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]})),
                             {"scam": "label"}, r"column 'label' holds 2 \(data row 3\); a binary"),
    "score outside [0, 1]": (lambda p: _csv(p, pd.DataFrame({"text": ["a", "b"], "label": [0.2, 1.7]})),
                             {"scam": "label"}, r"holds 1.7 \(data row 2\); a score must lie in \[0, 1\]"),
    "every text empty": (lambda p: _csv(p, pd.DataFrame({"text": ["  ", None], "label": [0, 1]})),
                         {"scam": "label"}, "every text is empty"),
    "invalid label name": (lambda p: _csv(p, pd.DataFrame({"text": ["a"], "label": [1]})),
                           {"Self-Harm": "label"}, "invalid label name 'Self-Harm': use a lower-case"),
    "unknown mapping kind": (lambda p: _csv(p, pd.DataFrame({"text": ["a"], "label": [1]})),
                             {"scam": {"column": "label", "merge": "median"}}, "merge"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path, capsys, monkeypatch):
    make, labels, pattern = BAD_INPUTS[case]
    path = make(tmp_path)
    config = write_config(tmp_path, [{"name": "src", "path": path, "labels": labels}])
    out = tmp_path / "prepared"
    code, _, err = run_cli(["prepare", "--config", config, "--output", out], capsys, monkeypatch)
    assert code == 2
    line = error_line(err)
    import re

    assert re.search(pattern, line), line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_prepare_refuses_a_non_empty_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run_cli(["prepare", "-c", "sample", "-o", out], capsys, monkeypatch)
    assert code == 2 and "already exists and is not empty" in error_line(err)
    assert (out / "keep.txt").read_text() == "user data"


def _mapped(tmp_path, frame, labels, active):
    tmp_path.mkdir(parents=True, exist_ok=True)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)  # JSON holds mixed types
    config = write_config(tmp_path, [{"name": "d", "path": "d.jsonl", "labels": labels}], labels=active)
    prepare(load_data_config(str(config)), tmp_path / "out")
    rows = _all_rows(tmp_path / "out").set_index("text").sort_index()
    return np.stack(rows["labels"].to_numpy()).tolist(), np.stack(rows["label_mask"].to_numpy()).tolist()


def test_multi_class_and_tag_list_mappings(tmp_path):
    frame = pd.DataFrame({
        "text": ["a", "b", "c", "d"],
        "emotion": [3, 0, 3, None],                                  # class id 3 means anger
        "tags": [["insult", "spam"], [], ["threat"], None],          # tag names
        "ids": [[0], [2], [0, 1], [1]],                              # tag ids, names below
    })
    y, m = _mapped(tmp_path, frame, {
        "toxicity": {"column": "emotion", "values": [3]},
        "harassment": {"column": "tags", "tags": ["insult"]},
        "violence": {"column": "tags", "tags": ["threat"]},
        "scam": {"column": "ids", "tags": ["phishing"], "tag_names": ["phishing", "malware", "benign"]},
    }, ["toxicity", "harassment", "violence", "scam"])
    assert y == [[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]]
    assert m == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]  # missing values: unannotated


def test_unexpected_values_are_masked_only_when_the_mapping_says_so(tmp_path):
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, 2, 0], "tags": [["x"], "x", ["y"]]})
    y, m = _mapped(tmp_path, frame, {"scam": {"column": "label", "unexpected": "mask"},
                                     "toxicity": {"column": "tags", "tags": ["x"], "unexpected": "mask"}},
                   ["scam", "toxicity"])
    assert y == [[1, 1], [0, 0], [0, 0]] and m == [[1, 1], [0, 0], [1, 1]]
    from cockatoo_lib.errors import CockatooError

    message = r"column 'tags' holds 'x' \(data row 2\); a tag column holds a list"
    with pytest.raises(CockatooError, match=message):
        _mapped(tmp_path / "again", frame, {"toxicity": {"column": "tags", "tags": ["x"]}}, ["toxicity"])


def test_mapping_kinds_are_checked_in_the_config(tmp_path):
    from cockatoo_lib.errors import CockatooError

    for mapping, message in [
        ({"column": "c", "values": [1], "tags": ["a"]}, "not both"),
        ({"columns": ["a", "b"], "values": [1]}, "exactly one column"),
        ({"column": "c", "tags": ["nope"], "tag_names": ["a"]}, "not among tag_names"),
    ]:
        config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "labels": {"scam": mapping}}])
        with pytest.raises(CockatooError, match=message):
            load_data_config(str(config))


@pytest.mark.parametrize("policy, texts, labels, masks, dropped", [
    ("keep_all", ["Hello  World", "hello world", "other", "spam"], None, None, 0),
    ("keep_first", ["Hello  World", "other", "spam"], [[1, 0], [0, 0], [1, 1]], None, 3),
    ("merge_labels", ["Hello  World", "other", "spam"], [[1, 0], [0, 0], [1, 1]],
     [[1, 1], [1, 1], [1, 1]], 3),
    ("drop_conflicts", ["other", "spam"], [[0, 0], [1, 1]], None, 4),
])
def test_dedup_policies(policy, texts, labels, masks, dropped, tmp_path):
    # Rows 1-3 are one text (case and whitespace differ); copies 1 and 2 disagree on scam.
    frame = pd.DataFrame({"text": ["Hello  World", "hello world", "HELLO world", "other", "spam", "Spam"],
                          "a": [1, 0, 1, 0, 1, 1], "b": [0, 0, None, 0, 1, 1]})
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    source = {"name": "d", "path": "d.jsonl", "labels": {"scam": "a", "toxicity": "b"}}
    config = write_config(tmp_path, [source], labels=["scam", "toxicity"], dedup=policy)
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    stats = manifest["sources"]["d"]
    assert (stats["duplicates"], stats["conflicts"], stats["duplicates_dropped"]) == (3, 3, dropped)
    rows = _all_rows(tmp_path / "out").set_index("text").loc[texts] if policy != "keep_all" else None
    if policy == "keep_all":
        assert stats["rows_kept"] == 6
        return
    assert sorted(_all_rows(tmp_path / "out")["text"]) == sorted(texts)
    assert np.stack(rows["labels"].to_numpy()).tolist() == labels
    if masks:
        assert np.stack(rows["label_mask"].to_numpy()).tolist() == masks
