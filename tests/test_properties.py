"""Properties of the data layer over generated sources: any texts (unicode, empty, whitespace,
very long), any label values, duplicates that differ in case and spacing, conflicting copies.
Whatever the input, prepare either writes splits for which the invariants hold or refuses with
one CockatooError line."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from helpers import write_config
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from cockatoo_lib.data.prepare import SPLITS, load_data_config, prepare
from cockatoo_lib.errors import CockatooError

LABELS = ["scam", "spam"]
POLICIES = ["keep_all", "keep_first", "merge_labels", "drop_conflicts"]

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\t\n", "\u00a0", "Ünïcödé ✓", "😀 emoji"]),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(300, 1500)),
)
label = st.sampled_from([0, 1, None])
# Variants of one text that normalize to the same key: case and runs of whitespace.
variant = st.sampled_from([str, str.upper, lambda t: f"  {t}  ", lambda t: t.replace(" ", "  ")])


@st.composite
def sources(draw):
    pool = draw(st.lists(text, min_size=1, max_size=8))
    rows = draw(st.lists(st.tuples(st.integers(0, len(pool) - 1), variant, label, label),
                         min_size=1, max_size=50))
    return [{"text": form(pool[i]), "a": a, "b": b} for i, form, a, b in rows]


def normalized(t) -> str:
    return re.sub(r"\s+", " ", str(t).strip()).lower()


def _read_splits(out: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(out / f"{s}.parquet") for s in SPLITS}


def _expected_by_text(rows: list[dict]) -> dict[str, list[tuple]]:
    """Normalized text -> the (label, annotated) pairs of each copy, per label, in order."""
    groups: dict[str, list[tuple]] = {}
    for row in rows:
        key = normalized(row["text"])
        if key:
            groups.setdefault(key, []).append(tuple((row[c], row[c] is not None) for c in ("a", "b")))
    return groups


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=sources(), policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**32 - 1))
# Failures hypothesis found, kept: a text read as a number; copies split apart under keep_all;
# every row dropped as a conflict (a traceback).
@example(rows=[{"text": "0" * 300, "a": 0, "b": 0}], policy="keep_all", seed=0)
@example(rows=[{"text": "0", "a": 0, "b": 0}] * 6, policy="keep_all", seed=0)
@example(rows=[{"text": "0", "a": 0, "b": 0}, {"text": "0", "a": 0, "b": 1}], policy="drop_conflicts", seed=0)
def test_prepare_keeps_its_invariants_for_any_source(rows, policy, seed):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        pd.DataFrame(rows).to_json(folder / "d.jsonl", orient="records", lines=True, force_ascii=False)
        source = {"name": "d", "path": "d.jsonl", "labels": {"scam": "a", "spam": "b"}}
        config = write_config(folder, [source], labels=LABELS, dedup=policy)
        try:
            prepare(load_data_config(str(config)), folder / "out", seed=seed)
        except CockatooError as exc:
            event("refused")
            assert "\n" not in str(exc) and str(exc)
            assert not (folder / "out").exists()
            return
        splits = _read_splits(folder / "out")

    expected = _expected_by_text(rows)
    texts = {s: [normalized(t) for t in frame["text"]] for s, frame in splits.items()}
    every = [t for s in SPLITS for t in texts[s]]
    # A positive label is always an annotated one; nothing empty is kept.
    for frame in splits.values():
        if len(frame):
            y, m = np.stack(frame["labels"]), np.stack(frame["label_mask"])
            assert ((y == 1) <= (m == 1)).all()
    assert all(every) and set(every) <= set(expected)
    # No text lands in two splits.
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(texts[a]) & set(texts[b]), (a, b)
    # Each dedup policy does what its name says.
    counts = pd.Series(every).value_counts()
    conflicted = {k for k, copies in expected.items()
                  if any({v for v, annotated in (c[j] for c in copies) if annotated} == {0, 1}
                         for j in range(len(LABELS)))}
    if policy == "keep_all":
        assert sorted(every) == sorted(k for k, copies in expected.items() for _ in copies)
        return
    assert (counts == 1).all()
    kept = set(every)
    if policy == "drop_conflicts":
        assert kept == set(expected) - conflicted
    else:
        assert kept == set(expected)
    for frame in splits.values():
        for t, y, m in zip(frame["text"], frame["labels"], frame["label_mask"]):
            copies = expected[normalized(t)]
            for j in range(len(LABELS)):
                values = [v for v, annotated in (c[j] for c in copies) if annotated]
                if policy == "merge_labels":
                    assert (m[j], y[j]) == (int(bool(values)), int(1 in values))
                else:  # the first copy's labels
                    first, annotated = copies[0][j]
                    assert (m[j], y[j]) == (int(annotated), int(bool(first) and annotated))


def test_texts_that_look_like_numbers_stay_as_written(tmp_path):
    texts = ["007", "1e5", "0", "12345678901234567890123"]
    frame = pd.DataFrame({"text": texts, "a": [1, 0, 1, 0]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    for name in ("d.csv", "d.jsonl"):
        config = write_config(tmp_path, [{"name": "d", "path": name, "labels": {"scam": "a"}}],
                              validation_fraction=0.25, test_fraction=0.25)
        out = tmp_path / name.replace(".", "-")
        prepare(load_data_config(str(config)), out)
        kept = [t for split in _read_splits(out).values() for t in split["text"]]
        assert sorted(kept) == sorted(texts), name
