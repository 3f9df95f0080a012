"""Data prep: read the sources a data config lists, map their columns onto the label set,
clean, split, and write one Parquet file per split plus a manifest.

A label that a source does not annotate is masked (`label_mask` 0) for that source's rows,
never filled with 0: a zero would teach the model that those rows are negatives.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import posixpath
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cockatoo_lib.data.clip_images import Fetch, ImageStore, load_image_column
from cockatoo_lib.data.tables import open_read, read_chunks, table_format
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.limits import check_range
from cockatoo_lib.storage.fileio import atomic_output_dir, check_output, read_json, sha256_files, write_json
from cockatoo_lib.training.rebalance import Rebalance, rebalance

log = logging.getLogger(__name__)

# The moderation label names the project was born with; the presets use them. A data config
# may declare any other names (a team's own taxonomy): lower-case identifiers, unique.
KNOWN_LABELS = ("scam", "violence", "nsfw", "harassment", "hate_speech", "toxicity",
                "obscenity", "jailbreaking", "genocide")
LABEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SPLITS = ("train", "validation", "test")
HOLDOUT = "holdout"  # the data config's fixed holdout: scored by the promote gate, never trained on
MANIFEST = "manifest.json"
BATCH_ROWS = 100_000  # rows read, mapped and hashed at a time
COLLECT_ROWS = 100_000  # rows between garbage collections (one takes ~10 ms in prepare's process)
PRESETS_DIR = Path(__file__).parents[1] / "presets"


class LabelMapping(BaseModel):
    """How one label is read from a source. Kinds:
    - one column or several merged (`column` / `columns`, `merge`): bool, 0/1, or a score in
      [0, 1] (an ordinal score too, once scaled) compared with `threshold`;
    - a multi-class column (`values`): positive where the column holds one of these values;
    - a tag-list column (`tags`): positive where the row's list holds one of these tags; with
      integer tag ids, `tag_names` gives the name of each id.
    Values a mapping does not expect are errors, unless `unexpected: mask` leaves such rows
    unannotated for this label."""

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(min_length=1)
    merge: Literal["or", "and", "max", "mean"] = "or"
    threshold: float = 0.5
    # The valid range of a score that does not lie in [0, 1] (e.g. an IRT score).
    range: tuple[float, float] | None = None
    values: list[int | str] | None = Field(default=None, min_length=1)
    tags: list[str | int] | None = Field(default=None, min_length=1)
    tag_names: list[str] | None = None
    unexpected: Literal["error", "mask"] = "error"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        if isinstance(value, str):
            return {"columns": [value]}
        if isinstance(value, dict) and "column" in value:
            value = dict(value)
            value["columns"] = [value.pop("column")]
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> LabelMapping:
        low, high = self.range or (0.0, 1.0)
        if not low < self.threshold < high:
            raise ValueError(f"threshold {self.threshold} must lie strictly inside ({low:g}, {high:g})")
        if self.values is not None and self.tags is not None:
            raise ValueError("give 'values' (a multi-class column) or 'tags' (a tag list), not both")
        if (self.values is not None or self.tags is not None) and len(self.columns) != 1:
            raise ValueError("'values' and 'tags' read exactly one column")
        if self.tag_names is not None:
            unknown = [t for t in self.tags or [] if t not in self.tag_names]
            if self.tags is None or unknown:
                raise ValueError(f"tags {unknown or ''} are not among tag_names")
        return self


class Source(BaseModel):
    """One data set: a file (local path, gs:// or s3:// URI; compressed too) or a Hugging Face Hub
    data set (`hub`: its id or a local folder in hub layout)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    split: str = "train"
    revision: str | None = None
    format: Literal["csv", "jsonl", "json", "parquet"] | None = None
    text_column: str = "text"
    # Optional: a column holding an image per row (see cockatoo_lib.data.clip_images for what it may
    # hold). Rows with and without images may mix; a row with an image may have no text.
    image_column: str | None = None
    # When several rows describe one item (one row per annotator, say): the column naming the
    # item. Its rows become one, numeric columns averaged, the others taken from the first row.
    item_column: str | None = None
    labels: dict[str, LabelMapping] = Field(min_length=1)
    # Labels this source has no column for but whose answer is known to be "no" on every row (a
    # chat source that holds no scam, say): its rows train and score as negatives for them
    # instead of being masked. Said here, per source, never assumed.
    negative_for: list[str] = Field(default_factory=list)
    # The data's license as its card gives it; the model card lists it beside the source.
    license: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> Source:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' and 'hub'")
        return self

    @property
    def where(self) -> str:
        return self.path if self.path is not None else f"hub:{self.hub}"

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels):
        for name in labels:
            _check_label_name(name)
        return labels

    @model_validator(mode="after")
    def _negative_for_unmapped(self) -> Source:
        both = [x for x in self.negative_for if x in self.labels]
        if both:
            raise ValueError(f"source {self.name}: label {both[0]!r} is both mapped in 'labels' and listed "
                             "in 'negative_for'; keep one")
        return self


def _check_label_name(name: str) -> None:
    if not LABEL_NAME.match(name):
        raise ValueError(f"invalid label name {name!r}: use a lower-case identifier "
                         "(a-z, 0-9 and _, starting with a letter, at most 64 characters)")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The active labels, in the order the model's outputs take. Omitted: every label some
    # source maps, the known names first (KNOWN_LABELS order), then the others as they appear.
    labels: list[str] | None = Field(default=None, min_length=1)
    sources: list[Source] = Field(min_length=1)
    # Duplicates are found on normalized text (case and runs of whitespace ignored):
    # keep_all keeps every row; keep_first the first copy; merge_labels the first copy with
    # the labels of all copies (a label positive in any annotated copy is positive);
    # drop_conflicts drops every copy of a text whose copies disagree, else keeps the first.
    dedup: Literal["keep_all", "keep_first", "merge_labels", "drop_conflicts"] = "keep_first"
    rebalance: Rebalance = Field(default_factory=Rebalance)
    # A missing or corrupt image: `error` stops with the row and path; `drop` drops the row
    # and counts it in the manifest.
    bad_images: Literal["error", "drop"] = "error"
    # Image URLs: per-request timeout and attempts (see cockatoo_lib.data.clip_images.Fetch).
    image_fetch: Fetch = Field(default_factory=Fetch)
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    # Salts the content hash that places each item in a split (see content_split). Apart from
    # the run seed, so that retrains with any seed score on the same test rows; changing it
    # reshuffles every split, and the promote gate then refuses to compare with the champion.
    split_seed: int = Field(default=42, ge=0)
    # Sources of a fixed holdout set: mapped like `sources`, written to holdout.parquet, never
    # trained on (training rows that repeat a holdout item are dropped); the promote gate
    # scores champion and challenger on it.
    holdout: list[Source] = Field(default_factory=list)
    base_dir: str = Field(default=".", exclude=True)  # a folder or URI; relative paths start here

    @property
    def has_images(self) -> bool:
        return any(src.image_column is not None for src in self.sources)

    @field_validator("labels")
    @classmethod
    def _valid_active(cls, labels):
        for name in labels or []:
            _check_label_name(name)
        repeated = sorted({x for x in labels or [] if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"label {repeated[0]!r} is declared twice")
        return labels

    @model_validator(mode="after")
    def _every_label_mapped(self) -> DataConfig:
        mapped = [name for src in self.sources for name in src.labels]
        clash = sorted({s.name for s in self.sources} & {s.name for s in self.holdout})
        if clash:
            raise ValueError(f"source name {clash[0]!r} is both a training source and a holdout source")
        for src in self.sources:
            stray = [x for x in src.negative_for if x not in mapped]
            if stray:
                raise ValueError(f"source {src.name}: negative_for names {stray[0]!r}, which no source maps "
                                 f"(mapped: {', '.join(dict.fromkeys(mapped))})")
        if self.labels is None:
            known = [x for x in KNOWN_LABELS if x in mapped]
            self.labels = known + [x for x in dict.fromkeys(mapped) if x not in known]
            return self
        unmapped = [x for x in self.labels if x not in mapped]
        if unmapped:
            raise ValueError(f"label {unmapped[0]!r} is declared but no source maps it; map it in a "
                             "source's 'labels' or leave it out")
        return self


def load_data_config(ref: str, labels: list[str] | None = None) -> DataConfig:
    """Load a data config from a YAML path or URI, or a preset name (cockatoo_lib/presets)."""
    if "://" not in ref and not Path(ref).suffix and (PRESETS_DIR / f"{ref}.yaml").is_file():
        ref = str(PRESETS_DIR / f"{ref}.yaml")
    try:
        text = open_read(ref, "data config").read().decode()
    except CockatooError:
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise CockatooError(f"data config {ref} not found (not a file, nor a preset: "
                            f"{', '.join(presets)})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CockatooError(f"data config {ref} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise CockatooError(f"data config {ref} must be a mapping with a 'sources' list")
    if labels:
        raw["labels"] = list(labels)
    try:
        return DataConfig(**raw, base_dir=posixpath.dirname(ref) if "://" in ref else str(Path(ref).parent))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"{'.'.join(str(p) for p in err['loc'])}: " if err["loc"] else "")
        raise CockatooError(f"data config {ref}: {where}{err['msg'].removeprefix('Value error, ')}") from None


# --------------------------------------------------------------------------- reading


def _source_path(src: Source, base_dir: str) -> str:
    if "://" in src.path or Path(src.path).expanduser().is_absolute():
        return src.path if "://" in src.path else str(Path(src.path).expanduser())
    return posixpath.join(base_dir, src.path) if "://" in base_dir else str(Path(base_dir) / src.path)


def _open_hub(src: Source):
    import datasets

    try:
        return datasets.load_dataset(src.hub, src.hub_config, split=src.split, revision=src.revision)
    except Exception as exc:  # noqa: BLE001 - network, auth and layout errors all land here
        raise CockatooError(
            f"source {src.name}: cannot load hub data set {src.hub} (split {src.split}): "
            f"{str(exc).strip().splitlines()[0][:200]}; point 'path' at a local copy, or set "
            "HF_HUB_OFFLINE=1 to read it from the local Hugging Face cache") from None


def source_batches(src: Source, base_dir: str) -> Iterator[pd.DataFrame]:
    """A source's rows, at most BATCH_ROWS at a time, each batch's index numbering its rows in
    the source from 0. A source with an `item_column` comes whole: an item's rows may lie
    anywhere in it."""
    rows = None if src.item_column is not None else BATCH_ROWS
    if src.hub is not None:
        data = _open_hub(src)
        chunks = [data.to_pandas()] if rows is None else data.to_pandas(batch_size=rows, batched=True)
        where = f"hub data set {src.hub}"
    else:
        path = _source_path(src, base_dir)
        chunks = read_chunks(path, f"source {src.name}", rows, src.format, src.text_column)
        where = path
    start = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        chunk.index = pd.RangeIndex(start, start + len(chunk))
        start += len(chunk)
        yield chunk
    if not start:
        raise CockatooError(f"source {src.name}: {where} has no rows")


def _label_scores(frame: pd.DataFrame, column: str, src: Source, path: str,
                  unexpected: str = "error", score_range: tuple[float, float] | None = None) -> pd.Series:
    """A label column as float scores, in [0, 1] unless a range is given (NaN: not annotated)."""
    values = frame[column]
    if pd.api.types.is_bool_dtype(values):
        return values.astype("float64")
    if pd.api.types.is_numeric_dtype(values):
        scores = values.astype("float64")
        if score_range is not None:
            bad = scores.notna() & ((scores < score_range[0]) | (scores > score_range[1]))
            expected = f"this score must lie in [{score_range[0]:g}, {score_range[1]:g}]"
        elif pd.api.types.is_integer_dtype(values) or _integral(scores):
            bad = scores.notna() & ~scores.isin([0.0, 1.0])
            expected = "a binary label column holds only 0 and 1"
        else:
            bad = scores.notna() & ((scores < 0) | (scores > 1))
            expected = "a score must lie in [0, 1]"
        bad = bad.to_numpy()
    else:
        # An object column: bools with blanks, or numbers beside text. The first value that is
        # neither a bool nor a number is what the user must fix.
        is_bool = values.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy(dtype=bool)
        numbers = pd.to_numeric(values.where(~is_bool), errors="coerce")
        bad = values.notna().to_numpy() & ~is_bool & numbers.isna().to_numpy()
        scores = numbers.where(~is_bool, values.where(is_bool).astype("float64"))
        expected = "expected bool, 0/1 or a score in [0, 1]"
    return _unexpected(scores, bad, values, expected, src, path, column, unexpected)


def _unexpected(scores: pd.Series, bad: np.ndarray, raw: pd.Series, expected: str, src: Source,
                path: str, column: str, policy: str) -> pd.Series:
    """Raise on the first unexpected value, or (policy `mask`) leave those rows unannotated."""
    if not bad.any():
        return scores
    if policy == "mask":
        return scores.mask(bad)
    row = int(np.flatnonzero(bad)[0])
    value = raw.iloc[row]
    shown = _num(value) if isinstance(value, float | np.floating | int | np.integer) else repr(value)
    raise CockatooError(f"source {src.name} ({path}), column {column!r} holds {shown} "
                        f"(data row {raw.index[row] + 1}); {expected}")  # the source's row number


def _class_hits(frame: pd.DataFrame, mapping: LabelMapping, src: Source, path: str) -> pd.Series:
    """1.0 / 0.0 / NaN for a multi-class or tag-list mapping."""
    column = mapping.columns[0]
    values = frame[column]
    if mapping.values is not None:
        return values.isin(mapping.values).astype("float64").mask(values.isna())
    wanted = set(mapping.tags)
    if mapping.tag_names is not None:  # integer ids in the data, names in the config
        wanted = {mapping.tag_names.index(t) for t in wanted}
    is_list = values.map(lambda v: isinstance(v, list | tuple | np.ndarray)).to_numpy(dtype=bool)
    exploded = values.where(is_list).explode()
    hits = exploded.isin(wanted).groupby(level=0).any().astype("float64")
    hits = hits.reindex(values.index).mask(~is_list)
    bad = values.notna().to_numpy() & ~is_list
    return _unexpected(hits, bad, values, "a tag column holds a list of tags per row",
                       src, path, column, mapping.unexpected)


def _integral(scores: pd.Series) -> bool:
    known = scores.dropna()
    return bool(len(known)) and bool((known == np.floor(known)).all()) and known.max() > 1


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def map_labels(frame: pd.DataFrame, src: Source, path: str,
               labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels, mask) arrays of shape (rows, len(labels)), int8."""
    n = len(frame)
    out = np.zeros((n, len(labels)), dtype=np.int8)
    mask = np.zeros((n, len(labels)), dtype=np.int8)
    for j, label in enumerate(labels):
        mapping = src.labels.get(label)
        if mapping is None:
            continue
        for col in mapping.columns:
            if col not in frame.columns:
                raise CockatooError(
                    f"source {src.name} ({path}): label column {col!r} for {label} not found; "
                    f"columns: {', '.join(map(str, frame.columns))}"
                )
        if mapping.values is not None or mapping.tags is not None:
            scores = _class_hits(frame, mapping, src, path).to_frame()
        else:
            scores = pd.concat([_label_scores(frame, c, src, path, mapping.unexpected, mapping.range)
                                for c in mapping.columns], axis=1)
        annotated = scores.notna().any(axis=1).to_numpy()
        if mapping.merge in ("max", "mean"):
            merged = scores.max(axis=1) if mapping.merge == "max" else scores.mean(axis=1)
            positive = (merged >= mapping.threshold).to_numpy()
        else:
            hits = scores >= mapping.threshold
            if mapping.merge == "or":
                positive = hits.any(axis=1).to_numpy()
            else:
                positive = (hits | scores.isna()).all(axis=1).to_numpy()
        out[:, j] = positive & annotated
        mask[:, j] = annotated
    for j, label in enumerate(labels):
        if label in src.negative_for:
            mask[:, j] = 1
    return out, mask


@dataclass
class Rows:
    """The rows of some sources that hold a text or an image, as prepare decides on them: per
    row its source, labels, mask, split and dedup digest (and image id). The texts wait in
    an Arrow file on disk until the splits are written, so memory grows by tens of bytes per
    row, not by the texts."""

    sources: list[str]
    source: np.ndarray  # int16 index into `sources`
    y: np.ndarray
    m: np.ndarray
    split: np.ndarray  # int8 index into SPLITS, by SPLIT_RULE
    digest: np.ndarray  # (rows, 2) uint64, a 128-bit hash of the dedup key: copies share it
    image_id: np.ndarray | None  # into the ImageStore (-1: none); None when no source has images
    texts: Path  # Arrow IPC file of the texts, in row order


def load_rows(config: DataConfig, store: ImageStore, folder: Path) -> tuple[Rows, np.ndarray, dict]:
    """Read, map and clean every source a batch at a time, then deduplicate. Returns the rows,
    the indices of those that dedup keeps (and, with merge_labels, the merged labels in the
    rows), and per-source statistics."""
    labels = config.labels
    parts: dict[str, list] = {"source": [], "y": [], "m": [], "split": [], "digest": [], "image_id": []}
    stats: dict[str, dict] = {}
    texts = folder / "texts.arrow"
    with pa.ipc.new_file(str(texts), pa.schema([("text", pa.string())])) as spill:
        for number, src in enumerate(config.sources):
            stats[src.name] = _load_source(config, src, number, spill, parts, store)
    if not sum(map(len, parts["source"])):
        raise CockatooError(
            f"every text is empty{' and no row has an image' if config.has_images else ''} in every "
            "source: " + ", ".join(f"{n} ({s['path']})" for n, s in stats.items()))
    joined = {"image_id": None}
    for name in [n for n in parts if parts[n]]:  # a field at a time: its pieces go as it is joined
        joined[name] = np.concatenate(parts.pop(name))
    rows = Rows(sources=[src.name for src in config.sources], texts=texts, **joined)
    keep, rows.y, rows.m, dup, conflict = deduplicate(rows.digest, rows.y, rows.m, config.dedup)
    if not keep.any():
        raise CockatooError(f"no row is left after dedup {config.dedup!r}: every text has copies whose "
                            "labels disagree; fix the labels or choose another dedup policy")
    for number, name in enumerate(rows.sources):
        here = rows.source == number
        stats[name].update(duplicates=int((dup & here).sum()), conflicts=int((conflict & here).sum()),
                           duplicates_dropped=int((~keep & here).sum()), rows_kept=int((keep & here).sum()))
    for j, label in enumerate(labels):
        if not rows.m[:, j].any():
            log.warning("no source annotates label %s: it will be masked everywhere", label)
    return rows, np.flatnonzero(keep), stats


def _load_source(config: DataConfig, src: Source, number: int, spill, parts: dict, store: ImageStore) -> dict:
    labels = config.labels
    path = src.where if src.hub is not None else _source_path(src, config.base_dir)
    stats = {"path": src.where, "license": src.license, "rows_read": 0, "items": 0}
    image_stats: dict[str, int] = {}
    empty = uncollected = 0
    needed = _needed_columns(src, labels)
    # JSON lines name a column in the records that have it: a batch may lack one the file has.
    lazy = src.hub is None and table_format(path, f"source {src.name}", src.format) == "jsonl"
    columns: list[str] = []
    for frame in source_batches(src, config.base_dir):
        columns += [c for c in frame.columns if c not in columns]
        absent = [c for c in needed if c not in frame.columns]
        if absent and not lazy:
            _check_columns(src, path, columns, labels)
        for column in absent:
            frame[column] = np.nan
        stats["rows_read"] += len(frame)
        if src.item_column is not None:
            frame = one_row_per_item(frame, src)
        stats["items"] += len(frame)
        y, m = map_labels(frame, src, path, labels)
        text = frame[src.text_column].astype("string").str.strip().fillna("")
        has_text = (text != "").to_numpy()
        n = len(frame)
        ids, digests, bad = np.full(n, -1, np.int64), np.full(n, "", object), np.zeros(n, bool)
        if src.image_column is not None:
            # Relative image paths start at the source file's folder (the config's for hub sets).
            where = config.base_dir if src.hub is not None else _parent(path)
            images = load_image_column(frame[src.image_column], where, src.name, path, src.image_column,
                                       config.bad_images, store, config.image_fetch, first_row=frame.index[0])
            ids, digests, bad = images.ids, images.digests, images.bad
            for key, count in images.stats.items():
                image_stats[key] = image_stats.get(key, 0) + count
        keep = (has_text | (ids >= 0)) & ~bad
        empty += int((~has_text & (ids < 0) & ~bad).sum())
        if not keep.any():
            continue
        kept = pd.Series(text[keep].to_numpy(dtype=object))
        spill.write_batch(pa.record_batch([pa.array(kept, type=pa.string())], names=["text"]))
        key = dedup_key(kept, pd.Series(digests[keep]) if config.has_images else None)
        parts["source"].append(np.full(len(kept), number, np.int16))
        parts["y"].append(y[keep])
        parts["m"].append(m[keep])
        parts["split"].append(split_codes(split_draws(key, config.split_seed), config.validation_fraction,
                                          config.test_fraction))
        parts["digest"].append(key_digests(key))
        if config.has_images:
            parts["image_id"].append(ids[keep])
        uncollected += n
        if uncollected >= COLLECT_ROWS:  # pandas' string accessors leave reference cycles that hold
            del frame, text, key         # a batch's texts: 10M rows took 0.3 GiB more without this
            gc.collect()
            uncollected = 0
    _check_columns(src, path, columns, labels)
    stats.update(image_stats)
    stats.update(empty_rows_dropped=empty, annotates=[x for x in labels if x in src.labels],
                 negative_for=[x for x in labels if x in src.negative_for])
    return stats


def _needed_columns(src: Source, labels: list[str]) -> list[str]:
    named = [src.text_column, src.image_column, src.item_column]
    named += [c for label in labels if label in src.labels for c in src.labels[label].columns]
    return list(dict.fromkeys(c for c in named if c is not None))


def _check_columns(src: Source, path: str, columns: list[str], labels: list[str]) -> None:
    """Every column the source's mapping names is there, or one line naming the first missing."""
    shown = ", ".join(map(str, columns))
    for kind, column in (("text", src.text_column), ("image", src.image_column), ("item", src.item_column)):
        if column is not None and column not in columns:
            raise CockatooError(f"source {src.name} ({path}): {kind} column {column!r} not found; "
                                f"columns: {shown}")
    for label in labels:
        for col in src.labels[label].columns if label in src.labels else []:
            if col not in columns:
                raise CockatooError(f"source {src.name} ({path}): label column {col!r} for {label} not "
                                    f"found; columns: {shown}")


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if "://" in uri else str(Path(uri).parent)


def one_row_per_item(frame: pd.DataFrame, src: Source) -> pd.DataFrame:
    """One row per item (the source's item_column, checked by _check_columns)."""
    numeric = frame.select_dtypes(include=["number", "bool"]).columns.drop(src.item_column, errors="ignore")
    how = {c: ("mean" if c in numeric else "first") for c in frame.columns if c != src.item_column}
    return frame.groupby(src.item_column, sort=False).agg(how).reset_index()


def normalize_text(text: pd.Series) -> pd.Series:
    return text.str.lower().str.replace(r"\s+", " ", regex=True)


def dedup_key(text: pd.Series, image_digests: pd.Series | None = None) -> pd.Series:
    """What makes two rows copies: the normalized text, and the image's digest if any."""
    key = normalize_text(text)
    return key if image_digests is None else key + "\x00" + image_digests


# Two independent keyed 64-bit hashes of a dedup key: 128 bits, so that two different keys
# among billions of rows share a digest with a chance below 1e-20.
DIGEST_KEYS = ("cockatoo-dedup-1", "cockatoo-dedup-2")


def key_digests(keys: pd.Series) -> np.ndarray:
    values = keys.to_numpy(dtype=object)
    return np.stack([pd.util.hash_array(values, hash_key=k) for k in DIGEST_KEYS], axis=1)


def copy_groups(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies found by sorting their digests: (a group number per row, copies sharing one; the
    rows in sorted order; where each group starts in that order). The sort is stable, so a
    group's first row in the sources comes first. Sorting holds a few arrays of 8 bytes per row,
    where a hash table of 10M keys held gigabytes."""
    order = np.lexsort((digests[:, 1], digests[:, 0]))
    ordered = digests[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    del ordered
    groups = np.empty(len(order), np.int64)
    groups[order] = np.cumsum(starts) - 1
    return groups, order, np.flatnonzero(starts)


def deduplicate(digests: np.ndarray, y: np.ndarray, m: np.ndarray, policy: str):
    """Returns (rows to keep, labels, mask, is-duplicate, in-conflict), vectorized; rows with
    the same digest (key_digests) are copies.

    A row is a duplicate when its normalized text (and image, if any) appeared before; its
    group is in conflict when one label is annotated positive in one copy and negative in
    another. Two different images with the same caption are not duplicates."""
    groups, order, starts = copy_groups(digests)
    first = np.zeros(len(groups), bool)
    first[order[starts]] = True

    def in_any_copy(bits: np.ndarray) -> np.ndarray:  # per row: the OR over its group's rows
        packed = np.packbits(bits.astype(bool), axis=1)[order]
        merged = np.bitwise_or.reduceat(packed, starts, axis=0) if len(starts) else packed
        return np.unpackbits(merged, axis=1, count=bits.shape[1])[groups].astype(bool)

    positive, negative, annotated = in_any_copy(y * m), in_any_copy((1 - y) * m), in_any_copy(m)
    conflict = (positive & negative).any(axis=1)
    if policy == "merge_labels":
        y, m = positive.astype(np.int8), annotated.astype(np.int8)
    keep = {"keep_all": np.ones(len(groups), bool), "keep_first": first, "merge_labels": first,
            "drop_conflicts": first & ~conflict}[policy]
    return keep, y, m, ~first, conflict


# --------------------------------------------------------------------------- splitting


SPLIT_RULE = ("blake2b-64 of 'cockatoo-split-v1:<split_seed>:' + dedup key (normalized text, "
              "+ NUL + image digest) as u in [0, 1): test if u < test_fraction, validation if "
              "u < test_fraction + validation_fraction, else train")


def split_draws(keys: pd.Series, split_seed: int) -> np.ndarray:
    """Each key's u of SPLIT_RULE."""
    salt = f"cockatoo-split-v1:{split_seed}:".encode()
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") for k in keys),
        dtype=np.uint64, count=len(keys))
    return draws / 2.0**64


def split_codes(draws: np.ndarray, val_frac: float, test_frac: float) -> np.ndarray:
    """Each draw's split, as an index into SPLITS."""
    return np.where(draws < test_frac, 2, np.where(draws < test_frac + val_frac, 1, 0)).astype(np.int8)


def rows_per_split(codes: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.flatnonzero(codes == k) for k, name in enumerate(SPLITS)}


def content_split(keys: pd.Series, split_seed: int, val_frac: float, test_frac: float
                  ) -> dict[str, np.ndarray]:
    """Row indices per split, each row's split a function of its own content (SPLIT_RULE).

    Adding or removing other rows never moves a row, so a model retrained on grown data is
    never scored on rows an earlier model trained on; copies of an item share a split.
    Sizes are binomial around the fractions (within a point of them past a few thousand
    items) and labels are spread at random, not stratified: stratifying would make a row's
    split depend on the other rows."""
    return rows_per_split(split_codes(split_draws(keys, split_seed), val_frac, test_frac))


def _list_column(values: np.ndarray) -> pa.Array:
    rows, width = values.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.int8()))


# Row groups as pyarrow's write_table makes them by default; with images, small ones, so that a
# group's image bytes are read from the store and written a group at a time.
ROWS_PER_GROUP = 1024 * 1024
IMAGE_ROWS_PER_GROUP = 256
SPLIT_SCHEMA = pa.schema([("text", pa.string()), ("labels", pa.list_(pa.int8())),
                          ("label_mask", pa.list_(pa.int8())), ("source", pa.string())])


def write_splits(rows: Rows, parts: dict[Path, np.ndarray], store: ImageStore | None = None) -> None:
    """Write each file's rows (indices into `rows`, ascending, repeats allowed) as Parquet,
    reading the texts from disk once, a batch at a time."""
    group = ROWS_PER_GROUP if rows.image_id is None else IMAGE_ROWS_PER_GROUP
    schema = SPLIT_SCHEMA if rows.image_id is None else SPLIT_SCHEMA.append(pa.field("image", pa.binary()))
    names = np.array(rows.sources, dtype=object)

    def row_group(index: np.ndarray, texts: list[pa.Array]) -> pa.Table:
        columns = [pa.concat_arrays(texts) if texts else pa.array([], pa.string()),
                   _list_column(rows.y[index]), _list_column(rows.m[index]),
                   pa.array(names[rows.source[index]], type=pa.string())]
        if rows.image_id is not None:
            columns.append(store.take(rows.image_id[index]))
        return pa.Table.from_arrays(columns, schema=schema)

    # Read, not memory-mapped: the pages of a mapped file count in the process's resident memory.
    with contextlib.ExitStack() as stack, pa.OSFile(str(rows.texts)) as spilled:
        writers = {path: stack.enter_context(pq.ParquetWriter(path, schema, compression="zstd"))
                   for path in parts}
        pending = {path: ([], []) for path in parts}  # the rows and texts of a row group to come
        written = dict.fromkeys(parts, False)
        reader, start = pa.ipc.open_file(spilled), 0
        for b in range(reader.num_record_batches):
            texts = reader.get_batch(b).column(0)
            for path, index in parts.items():
                low, high = np.searchsorted(index, [start, start + len(texts)])
                if low == high:
                    continue
                here = index[low:high]
                indices, chunks = pending[path]
                indices.append(here)
                chunks.append(texts.take(pa.array(here - start)))
                while sum(map(len, indices)) >= group:
                    taken, taken_texts = _cut(indices, chunks, group)
                    writers[path].write_table(row_group(taken, taken_texts))
                    written[path] = True
            start += len(texts)
        for path, (indices, chunks) in pending.items():
            # write_table writes a table without rows as one empty row group; so does this.
            if indices or (not written[path] and rows.image_id is None):
                writers[path].write_table(row_group(np.concatenate(indices or [np.zeros(0, int)]), chunks))


def _cut(indices: list[np.ndarray], chunks: list[pa.Array], size: int) -> tuple[np.ndarray, list[pa.Array]]:
    """Take the first `size` rows off the pending lists (in place)."""
    index = np.concatenate(indices)
    texts = pa.concat_arrays(chunks)
    indices[:] = [index[size:]] if len(index) > size else []
    chunks[:] = [texts.slice(size)] if len(index) > size else []
    return index[:size], [texts.slice(0, size)]


def prepare(config: DataConfig, output: str | Path, seed: int = 42, max_samples: int = 0,
            max_train_rows: int = 0) -> dict:
    """Write train/validation/test Parquet files and a manifest to `output`; return the manifest.
    `max_samples` draws rows before splitting (every split shrinks); `max_train_rows` draws from
    the train split alone, so training is capped for time while validation and test keep all
    their rows. Sources are read BATCH_ROWS rows at a time; what stays in memory is a few dozen
    bytes per row (Rows), so prepare's memory grows slowly with the rows, not with the texts."""
    check_range("seed", seed)
    check_range("max_samples", max_samples)
    check_range("max_train_rows", max_train_rows)
    check_output(output)
    # Fetched images and the texts wait on local disk until the splits are written.
    with ImageStore() as store, tempfile.TemporaryDirectory(prefix="cockatoo-prepare-") as spill:
        manifest = _prepare(config, output, seed, max_samples, max_train_rows, store, Path(spill))
    log.info("prepared %s: %s", output,
             ", ".join(f"{s} {manifest['splits'][s]['rows']} rows" for s in SPLITS))
    return manifest


def _prepare(config: DataConfig, output: str | Path, seed: int, max_samples: int, max_train_rows: int,
             store: ImageStore, spill: Path) -> dict:
    labels = config.labels
    (spill / "sources").mkdir()
    rows, index, stats = load_rows(config, store, spill / "sources")
    holdout = None
    if config.holdout:
        (spill / HOLDOUT).mkdir()
        holdout = load_rows(config.model_copy(update={"sources": config.holdout}), store, spill / HOLDOUT)
        held, held_index, _ = holdout
        groups, _, _ = copy_groups(np.concatenate([rows.digest[index], held.digest[held_index]]))
        seen = np.isin(groups[:len(index)], groups[len(index):])
        index = index[~seen]
        if not len(index):
            raise CockatooError("every training row repeats an item of the holdout set; nothing is "
                                "left to train on")
    if max_samples and len(index) > max_samples:
        index = index[np.sort(np.random.default_rng(seed).choice(len(index), max_samples, replace=False))]
    split = rows_per_split(rows.split[index])
    if max_train_rows and len(split["train"]) > max_train_rows:
        drawn = np.random.default_rng(seed).choice(split["train"], max_train_rows, replace=False)
        split["train"] = np.sort(drawn)
    train = index[split["train"]]
    train_rows, balance = rebalance(rows.y[train], rows.m[train], labels, config.rebalance, seed)
    split["train"] = split["train"][train_rows]
    parts = {name: index[positions] for name, positions in split.items()}
    manifest: dict = {"format_version": 1, "labels": labels, "seed": seed, "sources": stats,
                      "split_rule": {"rule": SPLIT_RULE, "split_seed": config.split_seed,
                                     "validation_fraction": config.validation_fraction,
                                     "test_fraction": config.test_fraction},
                      "splits": {}, "warnings": []}
    with atomic_output_dir(output) as tmp:
        write_splits(rows, {tmp / f"{name}.parquet": part for name, part in parts.items()}, store)
        for name, part in parts.items():
            manifest["splits"][name] = _split_stats(rows, part, labels)
        if holdout is not None:
            write_splits(held, {tmp / f"{HOLDOUT}.parquet": held_index}, store)
            manifest[HOLDOUT] = {**_split_stats(held, held_index, labels), "sources": holdout[2],
                                 "training_rows_dropped": int(seen.sum()),
                                 "fingerprint": sha256_files([tmp / f"{HOLDOUT}.parquet"])}
        if config.has_images:
            manifest["images"] = {"column": "image", "bad_images": config.bad_images,
                                  "dropped": sum(s.get("images_missing", 0) + s.get("images_corrupt", 0)
                                                 for s in stats.values())}
        manifest["rebalance"] = balance
        manifest["class_weights"] = balance["pos_weight"]  # BCE's pos_weight
        for label, count in manifest["splits"]["train"]["positives"].items():
            if count == 0:
                msg = f"active label {label} has no positive example in train"
                log.warning(msg)
                manifest["warnings"].append(msg)
        files = [tmp / f"{s}.parquet" for s in SPLITS]
        manifest["split_fingerprints"] = {s: sha256_files([f]) for s, f in zip(SPLITS, files)}
        manifest["fingerprint"] = sha256_files(files)
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _split_stats(rows: Rows, index: np.ndarray, labels: list[str]) -> dict:
    y, m = rows.y[index], rows.m[index]
    return {"rows": int(len(index)),
            **({"images": int((rows.image_id[index] >= 0).sum())} if rows.image_id is not None else {}),
            "positives": dict(zip(labels, (y * m).sum(axis=0).tolist())),
            "annotated": dict(zip(labels, m.sum(axis=0).tolist()))}


def read_manifest(data_dir: str | Path) -> dict:
    manifest = read_json(Path(data_dir) / MANIFEST, "data manifest")
    for key in ("labels", "splits", "fingerprint"):
        if key not in manifest:
            raise CockatooError(f"data manifest {Path(data_dir) / MANIFEST} lacks {key!r}")
    return manifest
