import json
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import error_line, run_cli, write_config

from cockatoo_lib.data.prepare import SPLITS, content_split, load_data_config, prepare
from cockatoo_lib.errors import CockatooError


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
    # Content-hashed splits are binomial: three standard deviations of 10% of ~2,000 rows.
    spread = 3 * (0.09 * len(rows)) ** 0.5
    assert counts["validation"] == pytest.approx(0.1 * len(rows), abs=spread)
    assert counts["test"] == pytest.approx(0.1 * len(rows), abs=spread)
    train = _read(sample_data)
    y, m = np.stack(train["labels"].to_numpy()), np.stack(train["label_mask"].to_numpy())
    assert manifest["splits"]["train"]["positives"] == dict(zip(labels, (y * m).sum(0).tolist()))
    assert len(manifest["fingerprint"]) == 64
    assert all(0 < w <= 10 for w in manifest["class_weights"].values())


def test_splits_depend_on_the_split_seed_not_the_run_seed(tmp_path):
    config = load_data_config("sample")
    prepare(config, tmp_path / "a", seed=7)
    prepare(config, tmp_path / "b", seed=8)
    prepare(config.model_copy(update={"split_seed": 1}), tmp_path / "c", seed=7)
    for split in ("train", "validation", "test"):
        a = (tmp_path / "a" / f"{split}.parquet").read_bytes()
        assert a == (tmp_path / "b" / f"{split}.parquet").read_bytes()
        assert a != (tmp_path / "c" / f"{split}.parquet").read_bytes()
    rule = json.loads((tmp_path / "a" / "manifest.json").read_text())["split_rule"]
    assert rule["split_seed"] == 42 and rule["test_fraction"] == 0.1 and "blake2b" in rule["rule"]


def _texts(folder, split):
    return set(_read(folder, split)["text"])


def test_adding_rows_never_moves_an_old_row_to_another_split(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array(["spam", "prize", "hello", "kill", "meeting", "click", "free", "lunch"])
    texts = [" ".join(rng.choice(words, 6)) + f" {i}" for i in range(3300)]
    labels = rng.integers(0, 2, 3300)
    old = pd.DataFrame({"text": texts[:3000], "label": labels[:3000]})
    # The grown source: 10% new rows, shuffled in among the old ones.
    grown = pd.DataFrame({"text": texts, "label": labels}).sample(frac=1, random_state=1)
    splits = {}
    for name, frame in (("old", old), ("grown", grown)):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        config = write_config(tmp_path, [{"name": "s", "path": f"{name}.csv", "labels": {"scam": "label"}}])
        prepare(load_data_config(str(config)), tmp_path / name)
        splits[name] = {s: _texts(tmp_path / name, s) for s in ("train", "validation", "test")}
    for split in ("train", "validation", "test"):
        assert splits["old"][split] <= splits["grown"][split], split
        assert len(splits["grown"][split] - splits["old"][split]) > 0
    sizes = {s: len(v) / 3300 for s, v in splits["grown"].items()}
    assert sizes == pytest.approx({"train": 0.8, "validation": 0.1, "test": 0.1}, abs=0.02)


def test_content_split_sizes_stay_within_a_point_of_the_fractions_on_large_data():
    keys = pd.Series([f"text number {i}" for i in range(50_000)])
    parts = content_split(keys, 42, val_frac=0.1, test_frac=0.1)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(50_000))
    for split, frac in (("train", 0.8), ("validation", 0.1), ("test", 0.1)):
        assert len(parts[split]) / 50_000 == pytest.approx(frac, abs=0.01)
    # The same key lands in the same split whatever else is split beside it.
    alone = content_split(keys[:10], 42, 0.1, 0.1)
    for split, idx in alone.items():
        assert set(idx) == set(parts[split][parts[split] < 10])


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


def test_holdout_is_written_apart_and_its_items_are_never_trained_on(tmp_path):
    pd.DataFrame({"text": [f"row {i}" for i in range(200)] + ["Shared   ITEM"],
                  "label": [i % 2 for i in range(201)]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"body": ["shared item", "only in holdout"], "flag": [1, 0]}).to_csv(
        tmp_path / "fixed.csv", index=False)
    config = write_config(tmp_path, [{"name": "s", "path": "train.csv", "labels": {"scam": "label"}}],
                          holdout=[{"name": "fixed", "path": "fixed.csv", "text_column": "body",
                                    "labels": {"scam": "flag"}}])
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    assert set(_read(tmp_path / "out", "holdout")["text"]) == {"shared item", "only in holdout"}
    trained = set(_all_rows(tmp_path / "out")["text"])
    assert "Shared   ITEM" not in trained and len(trained) == 200
    assert manifest["holdout"]["rows"] == 2 and manifest["holdout"]["training_rows_dropped"] == 1
    assert manifest["holdout"]["positives"] == {"scam": 1}


def test_a_holdout_source_may_not_share_a_training_source_name(tmp_path, capsys, monkeypatch):
    pd.DataFrame({"text": ["a"], "label": [1]}).to_csv(tmp_path / "d.csv", index=False)
    source = {"name": "s", "path": "d.csv", "labels": {"scam": "label"}}
    config = write_config(tmp_path, [source], holdout=[source])
    code, _, err = run_cli(["prepare", "--config", config, "--output", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and "'s' is both a training source and a holdout source" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_train_cap_draws_from_the_train_split_alone(tmp_path):
    """`max_train_rows` caps training for time; validation and test keep every row they had."""
    config = load_data_config("sample")
    full = prepare(config, tmp_path / "full")
    capped = prepare(config, tmp_path / "capped", max_train_rows=300)
    assert capped["splits"]["train"]["rows"] == 300 < full["splits"]["train"]["rows"]
    for split in ("validation", "test"):
        assert (tmp_path / "capped" / f"{split}.parquet").read_bytes() == \
            (tmp_path / "full" / f"{split}.parquet").read_bytes()
    assert _texts(tmp_path / "capped", "train") < _texts(tmp_path / "full", "train")
    again = prepare(config, tmp_path / "again", max_train_rows=300)  # drawn with the seed
    assert again["fingerprint"] == capped["fingerprint"]


def _two_sources(tmp_path, negative_for):
    pd.DataFrame({"text": ["buy now http://x", "hello friend", "claim your prize"],
                  "scam": [1, 0, 1]}).to_csv(tmp_path / "phish.csv", index=False)
    pd.DataFrame({"text": ["you idiot", "nice weather", "what a moron"],
                  "toxic": [1, 0, 1]}).to_csv(tmp_path / "chat.csv", index=False)
    return write_config(tmp_path, [
        {"name": "phish", "path": "phish.csv", "labels": {"scam": "scam"}},
        {"name": "chat", "path": "chat.csv", "labels": {"toxicity": "toxic"}, **negative_for}],
        labels=["scam", "toxicity"])


def test_negative_for_annotates_a_sources_rows_as_negatives_for_the_labels_it_names(tmp_path):
    prepare(load_data_config(str(_two_sources(tmp_path, {"negative_for": ["scam"]}))), tmp_path / "out")
    rows = _all_rows(tmp_path / "out")
    chat = rows[rows["source"] == "chat"]
    assert np.stack(chat["label_mask"].to_numpy()).tolist() == [[1, 1]] * 3  # scam annotated: no
    assert [y[0] for y in chat["labels"]] == [0, 0, 0]
    phish = rows[rows["source"] == "phish"]
    assert np.stack(phish["label_mask"].to_numpy()).tolist() == [[1, 0]] * 3  # toxicity still masked
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sources"]["chat"]["negative_for"] == ["scam"]
    # Without it, the chat source's rows are masked for scam, as before.
    prepare(load_data_config(str(_two_sources(tmp_path, {}))), tmp_path / "plain")
    plain = _all_rows(tmp_path / "plain")
    assert all(m[0] == 0 for m in plain[plain["source"] == "chat"]["label_mask"])


@pytest.mark.parametrize("negative_for, expected", [
    (["toxicity"], "source chat: label 'toxicity' is both mapped in 'labels' and listed in 'negative_for'"),
    (["sacm"], "source chat: negative_for names 'sacm', which no source maps (mapped: scam, toxicity)"),
])
def test_negative_for_refuses_a_mapped_or_unknown_label(tmp_path, negative_for, expected):
    from cockatoo_lib.errors import CockatooError

    with pytest.raises(CockatooError, match="negative_for") as err:
        load_data_config(str(_two_sources(tmp_path, {"negative_for": negative_for})))
    assert expected in str(err.value) and "\n" not in str(err.value)


def _mixed_sources(folder):
    """Three formats and a hub data set, copies within and across sources, a label column that
    JSON lines name only in some records, a holdout, and labels that merge_labels must combine
    across batches."""
    rng = np.random.default_rng(3)
    words = np.array(["Free prize", "hello  THERE", "click here", "kill it", "lunch?", "nice pic"])
    texts = pd.Series(rng.choice(words, 90)) + " " + pd.Series(rng.integers(0, 25, 90)).astype(str)
    pd.DataFrame({"body": texts[:40], "scam": rng.integers(0, 2, 40), "tox": rng.random(40)}).to_csv(
        folder / "a.csv", index=False)
    records = [{"text": t, **({"scam": int(rng.integers(0, 2))} if i % 7 == 3 else {})}
               for i, t in enumerate(texts[40:70])]
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pd.DataFrame({"text": texts[70:].to_numpy(), "tox": rng.integers(0, 2, 20).astype(bool)}).to_parquet(
        folder / "c.parquet")
    pd.DataFrame({"text": texts[:6], "scam": 1}).to_csv(folder / "h.csv", index=False)
    (folder / "hubset" / "data").mkdir(parents=True)  # a Hugging Face data set in hub layout
    pd.DataFrame({"text": texts[50:65].to_numpy(), "scam": rng.integers(0, 2, 15)}).to_parquet(
        folder / "hubset" / "data" / "train-00000-of-00001.parquet")
    return write_config(folder, [{"name": "a", "path": "a.csv", "text_column": "body",
                                  "labels": {"scam": "scam", "toxicity": "tox"}},
                                 {"name": "b", "path": "b.jsonl", "labels": {"scam": "scam"}},
                                 {"name": "c", "path": "c.parquet", "labels": {"toxicity": "tox"}},
                                 {"name": "d", "hub": str(folder / "hubset"), "labels": {"scam": "scam"}}],
                        holdout=[{"name": "h", "path": "h.csv", "labels": {"scam": "scam"}}])


@pytest.mark.parametrize("dedup", ["keep_first", "merge_labels", "drop_conflicts"])
def test_reading_sources_in_batches_writes_the_same_bytes_as_reading_them_whole(dedup, tmp_path, monkeypatch):
    import cockatoo_lib.data.prepare as data

    config = load_data_config(str(_mixed_sources(tmp_path))).model_copy(update={"dedup": dedup})
    prepare(config, tmp_path / "whole", max_train_rows=30)
    monkeypatch.setattr(data, "BATCH_ROWS", 4)  # every source in many batches, copies across them
    prepare(config, tmp_path / "batches", max_train_rows=30)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == ["holdout.parquet", "manifest.json", *sorted(f"{s}.parquet" for s in SPLITS)]
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "batches" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert manifest["sources"]["a"]["duplicates"] > 0 and manifest["holdout"]["training_rows_dropped"] > 0


def test_row_groups_are_those_pyarrows_write_table_makes(tmp_path, monkeypatch):
    import cockatoo_lib.data.prepare as data

    monkeypatch.setattr(data, "ROWS_PER_GROUP", 5)
    monkeypatch.setattr(data, "BATCH_ROWS", 3)
    manifest = prepare(load_data_config(str(_mixed_sources(tmp_path))), tmp_path / "out")
    assert manifest["splits"]["train"]["rows"] > 10
    for split in ("train", "validation", "test", "holdout"):
        path = tmp_path / "out" / f"{split}.parquet"
        table = pq.read_table(path).cast(data.SPLIT_SCHEMA)
        pq.write_table(table, tmp_path / "again.parquet", compression="zstd", row_group_size=5)
        assert path.read_bytes() == (tmp_path / "again.parquet").read_bytes(), split


def test_a_bad_value_in_a_later_batch_names_its_row_in_the_file(tmp_path, capsys, monkeypatch):
    import cockatoo_lib.data.prepare as data

    monkeypatch.setattr(data, "BATCH_ROWS", 3)
    pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": [0] * 7 + [5, 0, 0]}).to_csv(
        tmp_path / "d.csv", index=False)
    config = write_config(tmp_path, [{"name": "d", "path": "d.csv", "labels": {"scam": "label"}}])
    with pytest.raises(CockatooError, match=r"column 'label' holds 5 \(data row 8\)"):
        prepare(load_data_config(str(config)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_json_lines_column_that_no_record_names_is_an_error_after_the_last_batch(tmp_path, monkeypatch):
    import cockatoo_lib.data.prepare as data

    monkeypatch.setattr(data, "BATCH_ROWS", 2)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "x": 1}) + "\n" for i in range(5)))
    config = write_config(tmp_path, [{"name": "d", "path": "d.jsonl", "labels": {"scam": "label"}}])
    with pytest.raises(CockatooError, match="label column 'label' for scam not found; columns: text, x$"):
        prepare(load_data_config(str(config)), tmp_path / "out")


def test_rows_of_one_item_become_one_and_a_missing_item_column_is_one_line(tmp_path, monkeypatch):
    import cockatoo_lib.data.prepare as data

    monkeypatch.setattr(data, "BATCH_ROWS", 2)  # an item's rows come whole all the same
    pd.DataFrame({"post": [7, 8, 7, 9, 7, 8], "text": ["a b", "c d", "a b", "e f", "a b", "c d"],
                  "toxic": [0, 0, 1, 1, 1, 0]}).to_csv(tmp_path / "votes.csv", index=False)
    config = write_config(tmp_path, [{"name": "v", "path": "votes.csv", "item_column": "post",
                                      "labels": {"toxicity": {"column": "toxic", "threshold": 0.5}}}])
    manifest = prepare(load_data_config(str(config)), tmp_path / "out")
    assert manifest["sources"]["v"]["rows_read"] == 6 and manifest["sources"]["v"]["items"] == 3
    rows = _all_rows(tmp_path / "out").set_index("text")
    assert {t: rows.loc[t, "labels"].tolist() for t in rows.index} == {"a b": [1], "c d": [0], "e f": [1]}
    config = write_config(tmp_path, [{"name": "v", "path": "votes.csv", "item_column": "thread",
                                      "labels": {"toxicity": "toxic"}}])
    with pytest.raises(CockatooError, match=r"source v \(.*votes.csv\): item column 'thread' not found; "
                                            r"columns: post, text, toxic$"):
        prepare(load_data_config(str(config)), tmp_path / "again")
