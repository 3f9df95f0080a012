"""Data prep: read the sources a data config lists, map their columns onto the label set,
clean, split, and write one Parquet file per split plus a manifest.

A label that a source does not annotate is masked (`label_mask` 0) for that source's rows,
never filled with 0: a zero would teach the model that those rows are negatives.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fsspec.utils import infer_compression
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cockatoo_lib.data.clip_images import Fetch, ImageStore, load_image_column
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.limits import check_range
from cockatoo_lib.storage import remote
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
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
MANIFEST = "manifest.json"
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
        text = _open(ref, "data config").read().decode()
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


def _open(uri: str, what: str):
    """Open a local path or fsspec URI for reading (decompressed by suffix), with one-line errors."""
    try:
        return remote.open_read(uri)
    except Exception as exc:  # noqa: BLE001 - each storage client raises its own types
        if remote.is_timeout(exc):  # fsspec's http reports a timeout as not found: look first
            raise CockatooError(f"{what}: cannot open {uri}: {remote.timeout_hint()}") from None
        if isinstance(exc, FileNotFoundError):
            detail = str(exc).strip()
            reason = f" ({detail})" if detail and detail not in uri else ""
            raise CockatooError(f"{what}: not found: {uri}{reason}") from None
        if isinstance(exc, PermissionError):
            raise CockatooError(f"{what}: no permission to read {uri}") from None
        why = remote.failure(exc) or (str(exc).strip().splitlines()[0]
                                      if isinstance(exc, ValueError | ImportError) else None)
        if why is None:
            raise
        raise CockatooError(f"{what}: cannot open {uri}: {why}") from None


def table_format(uri: str, what: str, fmt: str | None = None) -> str:
    """The format from the suffix under any compression suffix that fsspec opens here (the
    reader opens with compression="infer", so the two agree by construction)."""
    name = uri.lower()
    if infer_compression(name) is not None:
        name = posixpath.splitext(name)[0]
    suffix = posixpath.splitext(name)[1]
    fmt = fmt or FORMATS.get(suffix)
    if fmt is None:
        raise CockatooError(
            f"{what}: cannot tell the format of {uri} from its suffix "
            f"{suffix or '(none)'}; use one of {', '.join(FORMATS)} or set 'format'")
    return fmt


def _read_hub(src: Source) -> pd.DataFrame:
    import datasets

    try:
        data = datasets.load_dataset(src.hub, src.hub_config, split=src.split, revision=src.revision)
    except Exception as exc:  # noqa: BLE001 - network, auth and layout errors all land here
        raise CockatooError(
            f"source {src.name}: cannot load hub data set {src.hub} (split {src.split}): "
            f"{str(exc).strip().splitlines()[0][:200]}; point 'path' at a local copy, or set "
            "HF_HUB_OFFLINE=1 to read it from the local Hugging Face cache") from None
    return data.to_pandas()


def read_source(src: Source, base_dir: str) -> pd.DataFrame:
    if src.hub is not None:
        frame = _read_hub(src)
        if frame.empty:
            raise CockatooError(f"source {src.name}: hub data set {src.hub} has no rows")
        return frame
    return read_table(_source_path(src, base_dir), f"source {src.name}", src.format, src.text_column)


def read_table(uri: str, what: str, fmt: str | None = None, text_column: str | None = None) -> pd.DataFrame:
    """A CSV, JSON(L) or Parquet file, local or remote, maybe compressed; never empty."""
    fmt = table_format(uri, what, fmt)
    with _open(uri, what) as handle:
        try:
            # Texts stay as written: no reader may turn "007" or "1e5" into a number.
            if fmt == "csv":
                frame = pd.read_csv(handle, dtype={text_column: str} if text_column else None)
            elif fmt == "jsonl":
                frame = pd.read_json(handle, lines=True, dtype=False)
            elif fmt == "json":
                frame = pd.read_json(handle, dtype=False)
            elif infer_compression(uri.lower()) is not None:
                # Parquet seeks to its footer; a compressed stream (zstd, bz2) cannot seek.
                frame = pd.read_parquet(io.BytesIO(handle.read()))
            else:
                frame = pd.read_parquet(handle)
        except pd.errors.EmptyDataError:
            raise CockatooError(f"{what}: {uri} is empty") from None
        except Exception as exc:  # readers raise many types; all mean "not this format"
            if remote.is_timeout(exc):
                raise CockatooError(f"{what}: cannot read {uri}: {remote.timeout_hint()}") from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CockatooError(f"{what}: cannot read {uri} as {fmt}: {first}") from None
    if frame.empty:
        raise CockatooError(f"{what}: {uri} has no rows")
    return frame


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
                        f"(data row {row + 1}); {expected}")


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


def load_rows(config: DataConfig, store: ImageStore | None = None
              ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, dict]:
    """Read, map and clean every source. Returns (frame with text and source, and when any
    source has images, image_id (into `store`, -1: none) and image_digest; labels, mask, stats)."""
    labels = config.labels
    frames, label_parts, mask_parts, stats = [], [], [], {}
    for src in config.sources:
        path = src.where if src.hub is not None else _source_path(src, config.base_dir)
        frame = read_source(src, config.base_dir)
        for kind, column in (("text", src.text_column), ("image", src.image_column)):
            if column is not None and column not in frame.columns:
                raise CockatooError(
                    f"source {src.name} ({path}): {kind} column {column!r} not found; "
                    f"columns: {', '.join(map(str, frame.columns))}"
                )
        rows_read = len(frame)
        if src.item_column is not None:
            frame = one_row_per_item(frame, src, path)
        y, m = map_labels(frame, src, path, labels)
        text = frame[src.text_column].astype("string").str.strip().fillna("")
        has_text = (text != "").to_numpy()
        stats[src.name] = {"path": src.where, "license": src.license, "rows_read": int(rows_read),
                           "items": int(len(frame))}
        images, bad = None, np.zeros(len(frame), bool)
        if src.image_column is not None:
            # Relative image paths start at the source file's folder (the config's for hub sets).
            folder = config.base_dir if src.hub is not None else _parent(path)
            images = load_image_column(frame[src.image_column], folder, src.name, path,
                                       src.image_column, config.bad_images, store, config.image_fetch)
            bad = images.bad
            stats[src.name].update(images.stats)
        has_image = images.ids >= 0 if images is not None else np.zeros(len(frame), bool)
        keep = (has_text | has_image) & ~bad
        stats[src.name].update(empty_rows_dropped=int((~has_text & ~has_image & ~bad).sum()),
                               annotates=[x for x in labels if x in src.labels],
                               negative_for=[x for x in labels if x in src.negative_for])
        if not keep.any():
            continue
        part = pd.DataFrame({"text": text[keep].to_numpy(dtype=object), "source": src.name})
        if config.has_images:
            part["image_id"] = images.ids[keep] if images is not None else -1
            part["image_digest"] = images.digests[keep] if images is not None else ""
        frames.append(part)
        label_parts.append(y[keep])
        mask_parts.append(m[keep])
    if not frames:
        raise CockatooError(
            f"every text is empty{' and no row has an image' if config.has_images else ''} in every "
            "source: " + ", ".join(f"{n} ({s['path']})" for n, s in stats.items())
        )
    frame = pd.concat(frames, ignore_index=True)
    y, m = np.concatenate(label_parts), np.concatenate(mask_parts)
    digests = frame["image_digest"] if config.has_images else None
    keep, y, m, dup, conflict, _ = deduplicate(frame["text"], y, m, config.dedup, digests)
    frame["split_key"] = dedup_key(frame["text"], digests)  # copies share a key, so a split
    source = frame["source"].to_numpy()
    for name in stats:
        here = source == name
        stats[name].update(duplicates=int((dup & here).sum()), conflicts=int((conflict & here).sum()),
                           duplicates_dropped=int((~keep & here).sum()))
    if not keep.any():
        raise CockatooError(f"no row is left after dedup {config.dedup!r}: every text has copies whose "
                            "labels disagree; fix the labels or choose another dedup policy")
    frame = frame[keep].reset_index(drop=True)
    y, m = y[keep], m[keep]
    for name in stats:
        stats[name]["rows_kept"] = int((frame["source"] == name).sum())
    for j, label in enumerate(labels):
        if not m[:, j].any():
            log.warning("no source annotates label %s: it will be masked everywhere", label)
    return frame, y, m, stats


def _parent(uri: str) -> str:
    return posixpath.dirname(uri) if "://" in uri else str(Path(uri).parent)


def one_row_per_item(frame: pd.DataFrame, src: Source, path: str) -> pd.DataFrame:
    if src.item_column not in frame.columns:
        raise CockatooError(f"source {src.name} ({path}): item column {src.item_column!r} not found; "
                            f"columns: {', '.join(map(str, frame.columns))}")
    numeric = frame.select_dtypes(include=["number", "bool"]).columns.drop(src.item_column, errors="ignore")
    how = {c: ("mean" if c in numeric else "first") for c in frame.columns if c != src.item_column}
    return frame.groupby(src.item_column, sort=False).agg(how).reset_index()


def normalize_text(text: pd.Series) -> pd.Series:
    return text.str.lower().str.replace(r"\s+", " ", regex=True)


def dedup_key(text: pd.Series, image_digests: pd.Series | None = None) -> pd.Series:
    """What makes two rows copies: the normalized text, and the image's digest if any."""
    key = normalize_text(text)
    return key if image_digests is None else key + "\x00" + image_digests


def deduplicate(text: pd.Series, y: np.ndarray, m: np.ndarray, policy: str,
                image_digests: pd.Series | None = None):
    """Returns (rows to keep, labels, mask, is-duplicate, in-conflict, group), vectorized;
    copies of one text share a group.

    A row is a duplicate when its normalized text (and image, if any) appeared before; its
    group is in conflict when one label is annotated positive in one copy and negative in
    another. Two different images with the same caption are not duplicates."""
    codes, _ = pd.factorize(dedup_key(text, image_digests))
    first = ~pd.Series(codes).duplicated().to_numpy()
    grouped = pd.DataFrame(np.hstack([y * m, (1 - y) * m, m])).groupby(codes).transform("max").to_numpy()
    width = y.shape[1]
    positive, negative, annotated = (grouped[:, i * width:(i + 1) * width] for i in range(3))
    conflict = (positive & negative).any(axis=1)
    if policy == "merge_labels":
        y, m = positive.astype(np.int8), annotated.astype(np.int8)
    keep = {"keep_all": np.ones(len(text), bool), "keep_first": first, "merge_labels": first,
            "drop_conflicts": first & ~conflict}[policy]
    return keep, y, m, ~first, conflict, codes


# --------------------------------------------------------------------------- splitting


SPLIT_RULE = ("blake2b-64 of 'cockatoo-split-v1:<split_seed>:' + dedup key (normalized text, "
              "+ NUL + image digest) as u in [0, 1): test if u < test_fraction, validation if "
              "u < test_fraction + validation_fraction, else train")


def content_split(keys: pd.Series, split_seed: int, val_frac: float, test_frac: float
                  ) -> dict[str, np.ndarray]:
    """Row indices per split, each row's split a function of its own content (SPLIT_RULE).

    Adding or removing other rows never moves a row, so a model retrained on grown data is
    never scored on rows an earlier model trained on; copies of an item share a split.
    Sizes are binomial around the fractions (within a point of them past a few thousand
    items) and labels are spread at random, not stratified: stratifying would make a row's
    split depend on the other rows."""
    salt = f"cockatoo-split-v1:{split_seed}:".encode()
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") for k in keys),
        dtype=np.uint64, count=len(keys))
    u = draws / 2.0**64
    which = np.where(u < test_frac, 2, np.where(u < test_frac + val_frac, 1, 0))
    return {name: np.flatnonzero(which == k) for k, name in enumerate(SPLITS)}


def _list_column(values: np.ndarray) -> pa.Array:
    rows, width = values.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa.int8()))


IMAGE_ROWS_PER_GROUP = 256


def write_split(path: Path, frame: pd.DataFrame, y: np.ndarray, m: np.ndarray,
                store: ImageStore | None = None) -> None:
    table = pa.table({
        "text": pa.array(frame["text"].to_numpy(dtype=object), type=pa.string()),
        "labels": _list_column(y),
        "label_mask": _list_column(m),
        "source": pa.array(frame["source"].to_numpy(dtype=object), type=pa.string()),
    })
    if "image_id" not in frame:
        pq.write_table(table, path, compression="zstd")
        return
    # The images' encoded bytes as the sources had them (null: no image), read back from the
    # store a row group at a time so memory stays flat.
    ids = frame["image_id"].to_numpy()
    with pq.ParquetWriter(path, table.schema.append(pa.field("image", pa.binary())),
                          compression="zstd") as writer:
        for start in range(0, len(ids), IMAGE_ROWS_PER_GROUP):
            rows = slice(start, start + IMAGE_ROWS_PER_GROUP)
            writer.write_table(table[rows].append_column("image", store.take(ids[rows])))


def prepare(config: DataConfig, output: str | Path, seed: int = 42, max_samples: int = 0,
            max_train_rows: int = 0) -> dict:
    """Write train/validation/test Parquet files and a manifest to `output`; return the manifest.
    `max_samples` draws rows before splitting (every split shrinks); `max_train_rows` draws from
    the train split alone, so training is capped for time while validation and test keep all
    their rows."""
    check_range("seed", seed)
    check_range("max_samples", max_samples)
    check_range("max_train_rows", max_train_rows)
    check_output(output)
    with ImageStore() as store:  # fetched images wait on disk until the splits are written
        manifest = _prepare(config, output, seed, max_samples, max_train_rows, store)
    log.info("prepared %s: %s", output,
             ", ".join(f"{s} {manifest['splits'][s]['rows']} rows" for s in SPLITS))
    return manifest


def _prepare(config: DataConfig, output: str | Path, seed: int, max_samples: int, max_train_rows: int,
             store: ImageStore) -> dict:
    labels = config.labels
    frame, y, m, stats = load_rows(config, store)
    holdout = None
    if config.holdout:
        holdout = load_rows(config.model_copy(update={"sources": config.holdout}), store)
        seen = frame["split_key"].isin(set(holdout[0]["split_key"])).to_numpy()
        frame, y, m = frame[~seen].reset_index(drop=True), y[~seen], m[~seen]
        if not len(frame):
            raise CockatooError("every training row repeats an item of the holdout set; nothing is "
                                "left to train on")
    if max_samples and len(frame) > max_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(frame), max_samples, replace=False))
        frame, y, m = frame.iloc[keep].reset_index(drop=True), y[keep], m[keep]
    split = content_split(frame["split_key"], config.split_seed, config.validation_fraction,
                          config.test_fraction)
    if max_train_rows and len(split["train"]) > max_train_rows:
        drawn = np.random.default_rng(seed).choice(split["train"], max_train_rows, replace=False)
        split["train"] = np.sort(drawn)
    train_rows, balance = rebalance(y[split["train"]], m[split["train"]], labels, config.rebalance, seed)
    split["train"] = split["train"][train_rows]
    manifest: dict = {"format_version": 1, "labels": labels, "seed": seed, "sources": stats,
                      "split_rule": {"rule": SPLIT_RULE, "split_seed": config.split_seed,
                                     "validation_fraction": config.validation_fraction,
                                     "test_fraction": config.test_fraction},
                      "splits": {}, "warnings": []}
    parts = {name: (frame.iloc[idx], y[idx], m[idx]) for name, idx in split.items()}
    with atomic_output_dir(output) as tmp:
        for name, (rows, ys, ms) in parts.items():
            write_split(tmp / f"{name}.parquet", rows, ys, ms, store)
            manifest["splits"][name] = _split_stats(rows, ys, ms, labels, config.has_images)
        if holdout is not None:
            rows, ys, ms, holdout_stats = holdout
            write_split(tmp / f"{HOLDOUT}.parquet", rows, ys, ms, store)
            manifest[HOLDOUT] = {**_split_stats(rows, ys, ms, labels, config.has_images),
                                 "sources": holdout_stats, "training_rows_dropped": int(seen.sum()),
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


def _split_stats(frame: pd.DataFrame, y: np.ndarray, m: np.ndarray, labels: list[str],
                 images: bool) -> dict:
    return {"rows": int(len(frame)),
            **({"images": int((frame["image_id"] >= 0).sum())} if images else {}),
            "positives": dict(zip(labels, (y * m).sum(axis=0).tolist())),
            "annotated": dict(zip(labels, m.sum(axis=0).tolist()))}


def read_manifest(data_dir: str | Path) -> dict:
    manifest = read_json(Path(data_dir) / MANIFEST, "data manifest")
    for key in ("labels", "splits", "fingerprint"):
        if key not in manifest:
            raise CockatooError(f"data manifest {Path(data_dir) / MANIFEST} lacks {key!r}")
    return manifest
