"""Tokenization with a content-addressed cache per model.

KFP caches on artifact IDs, not content, so a rerun upstream step makes KFP rerun this one;
our cache makes that rerun cheap. Key = split fingerprints + tokenizer identity (name and a
hash of its files) + max length + PREPROCESSING_VERSION. The cache root is any fsspec URI
(a local folder, gs://, s3://) that two runs may share: entries are published and verified as
cockatoo_lib.storage.publish describes, under `<root>/tokenized/<key>/`.

For a model that reads images (CLIP), rows with an image also get cached pixels: see
cockatoo_lib.data.clip_images for their storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from cockatoo_lib.data.clip_images import (
    IMAGE_BACKEND,
    IMAGE_DECODE,
    PIXEL_COLUMN,
    load_image_processor,
    pixel_spec,
    to_pixels,
)
from cockatoo_lib.data.prepare import SPLITS, read_manifest
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import Plan
from cockatoo_lib.storage import remote
from cockatoo_lib.storage.fileio import atomic_output_dir, check_output, read_json, sha256_files, write_json
from cockatoo_lib.storage.publish import clean_abandoned, publish, read_published

log = logging.getLogger(__name__)

# Bump when the tokenized layout or the way texts become ids changes: old entries then miss.
# 2: label loss weights and learning-rate scale travel along; 3: text and source kept, diagnostics
PREPROCESSING_VERSION = 3
INFO = "tokenized.json"
DEFAULT_CACHE_ROOT = "~/.cache/cockatoo"


def load_tokenizer(plan: Plan):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(plan.base_model)
    except (OSError, ValueError) as exc:
        raise CockatooError(
            f"cannot load the tokenizer of {plan.model_type} from {plan.base_model}: "
            f"{str(exc).splitlines()[0]} (offline? set base_model to a local folder)"
        ) from None


def load_processors(plan: Plan):
    """The tokenizer, and the image processor for a model that reads images (else None)."""
    return load_tokenizer(plan), load_image_processor(plan.base_model) if plan.reads_images else None


def tokenizer_identity(tokenizer, image_processor=None) -> str:
    """Name plus a hash of the files the tokenizer (and image processor) save: a changed vocab
    or image size is a new identity."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        digest = sha256_files(files, root=Path(tmp))
    # A local folder's path differs between machines; its contents (the digest) do not.
    name = tokenizer.name_or_path
    images = f"+images({IMAGE_BACKEND},{IMAGE_DECODE})" if image_processor is not None else ""
    return f"{Path(name).name if Path(name).is_dir() else name}{images}@{digest[:16]}"


def cache_key(split_fingerprints: dict[str, str], identity: str, max_length: int,
              extension: str = "off") -> str:
    fields = {"splits": split_fingerprints, "tokenizer": identity, "max_length": max_length,
              "version": PREPROCESSING_VERSION}
    if extension != "off":  # the tokens added are a function of the train split: the key holds
        fields["tokenizer_extension"] = extension
    material = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _tokenize_split(path: Path, tokenizer, max_length: int, image_processor, work: Path):
    from datasets import Dataset, Features, Value

    with_images = image_processor is not None and "image" in pq.read_schema(path).names
    columns = ["text", "labels", "label_mask", "source"]
    if with_images:  # read through an on-disk Arrow cache: the images need not fit in memory
        dataset = Dataset.from_parquet(str(path), columns=[*columns, "image"],
                                       cache_dir=str(work / "parquet"))
    else:
        dataset = Dataset(pq.read_table(path, columns=columns))

    unk = tokenizer.unk_token_id
    special = tokenizer.num_special_tokens_to_add(pair=False)  # the same for every single text

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        # Diagnostics, dropped before saving: see _diagnostics.
        enc["truncated"] = [bool(e.overflowing) for e in enc.encodings]
        enc["unknown_tokens"] = [ids.count(unk) if unk is not None else 0 for ids in enc["input_ids"]]
        enc["text_tokens"] = [n - special for n in enc["length"]]
        return enc

    # The text stays beside its ids: evaluation fits its linear baseline on it.
    dataset = dataset.map(encode, batched=True, batch_size=1000, desc=f"tokenize {path.stem}")
    if not with_images:
        return dataset, 0.0
    features = Features({**{k: v for k, v in dataset.features.items() if k != "image"},
                         PIXEL_COLUMN: Value("binary")})
    # Written to a file in small batches: pixels take 150 kB per image, too much to hold.
    start = time.perf_counter()
    dataset = dataset.map(lambda batch: {PIXEL_COLUMN: to_pixels(batch["image"], image_processor)},
                          batched=True, batch_size=64, writer_batch_size=256, remove_columns=["image"],
                          features=features, cache_file_name=str(work / f"{path.stem}-pixels.arrow"),
                          desc=f"images {path.stem}")
    return dataset, time.perf_counter() - start


def _column_sum(dataset, column: str) -> int:
    """A column's sum in Arrow: iterating a Dataset's column formats every row (4 s per 100k)."""
    import pyarrow.compute as pc

    return int(pc.sum(dataset.with_format("arrow")[column]).as_py() or 0)


def tokens_to_add(tokenizer, train) -> list[str]:
    """The characters the tokenizer reads as unknown in the train split, most frequent first
    (ties in character order), at most MAX_ADDED_TOKENS; none when at most UNKNOWN_WARN_SHARE
    of the split's tokens are unknown."""
    unknown, tokens = _column_sum(train, "unknown_tokens"), _column_sum(train, "text_tokens")
    unk = tokenizer.unk_token_id
    if unk is None or unknown <= UNKNOWN_WARN_SHARE * max(tokens, 1):
        return []
    counts, unknown_alone = Counter(), {}
    texts = train["text"]
    for start in range(0, len(texts), 1000):
        batch = texts[start:start + 1000]
        encoded = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
        for text, ids, offsets in zip(batch, encoded["input_ids"], encoded["offset_mapping"]):
            for token, (begin, end) in zip(ids, offsets):
                if token != unk:
                    continue
                for char in text[begin:end]:  # a word piece holds known characters too
                    if char not in unknown_alone:
                        unknown_alone[char] = unk in tokenizer(char, add_special_tokens=False)["input_ids"]
                    if unknown_alone[char] and not char.isspace():
                        counts[char] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [char for char, _ in ranked[:MAX_ADDED_TOKENS]]


def _tokenize_splits(data_dir: Path, tokenizer, max_length: int, image_processor, work: Path):
    splits, image_seconds = {}, 0.0
    for split in SPLITS:
        splits[split], seconds = _tokenize_split(data_dir / f"{split}.parquet", tokenizer, max_length,
                                                 image_processor, work)
        image_seconds += seconds
    return splits, image_seconds


def _build_entry(data_dir: Path, tokenizer, image_processor, max_length: int, dest: Path,
                 extension: str = "off") -> dict:
    from datasets import DatasetDict

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        splits, image_seconds = _tokenize_splits(data_dir, tokenizer, max_length, image_processor, Path(work))
        added = tokens_to_add(tokenizer, splits["train"]) if extension == "auto" else []
        if added:  # tokenized again with them; train adds the same tokens and their embeddings
            before = _diagnostics(splits)
            tokenizer.add_tokens(added)
            splits, image_seconds = _tokenize_splits(data_dir, tokenizer, max_length, image_processor,
                                                     Path(work))
        truncated = {s: _column_sum(d, "truncated") for s, d in splits.items()}
        stats = {"rows": {s: len(d) for s, d in splits.items()}, "truncated": truncated,
                 "diagnostics": _diagnostics(splits)}
        if added:
            stats["tokenizer_extension"] = {"added_tokens": added, "diagnostics_before": before}
        if any(PIXEL_COLUMN in d.column_names for d in splits.values()):
            stats["images"] = _image_stats(splits, image_processor, image_seconds)
        DatasetDict({s: d.remove_columns(list(DIAGNOSTIC_COLUMNS)) for s, d in splits.items()}
                    ).save_to_disk(str(dest))
    stats["seconds"] = round(time.perf_counter() - start, 3)
    return stats


DIAGNOSTIC_COLUMNS = ("truncated", "unknown_tokens", "text_tokens")
# `tokenizer_extension: auto` adds at most this many characters: the 300 most frequent unknown
# characters covered 95% of the unknown occurrences of a noisy social-media set.
MAX_ADDED_TOKENS = 300
# Above this share of unknown tokens a source's texts are largely invisible to the model: the
# tokenizer does not cover their script, emoji or symbols.
UNKNOWN_WARN_SHARE = 0.05


def _diagnostics(splits) -> dict:
    """Share of unknown tokens (among the texts' own tokens) and of truncated texts, per split
    and per source."""
    import pandas as pd

    frames = [d.select_columns(["source", *DIAGNOSTIC_COLUMNS]).to_pandas().assign(split=s)
              for s, d in splits.items()]
    frame = pd.concat(frames, ignore_index=True)

    def shares(group) -> dict:
        tokens = int(group["text_tokens"].sum())
        return {"rows": int(len(group)),
                "unknown_token_share": round(float(group["unknown_tokens"].sum()) / max(tokens, 1), 6),
                "truncated_share": round(float(group["truncated"].mean()) if len(group) else 0.0, 6)}

    return {"overall": shares(frame),
            "splits": {s: shares(frame[frame["split"] == s]) for s in splits},
            "sources": {str(name): shares(group) for name, group in frame.groupby("source", sort=True)}}


def diagnostic_warnings(diagnostics: dict) -> list[str]:
    return [f"source {name}: {d['unknown_token_share']:.1%} of its tokens are unknown to the tokenizer "
            f"(above {UNKNOWN_WARN_SHARE:.0%}); the model cannot read those parts of its texts: "
            "check its language and script, or choose a model whose vocabulary covers them"
            for name, d in diagnostics["sources"].items() if d["unknown_token_share"] > UNKNOWN_WARN_SHARE]


def _image_stats(splits, image_processor, seconds: float) -> dict:
    columns = {s: d.data.column(PIXEL_COLUMN) for s, d in splits.items()}  # splits share a schema
    rows = {s: len(c) - c.null_count for s, c in columns.items()}
    stored = sum(c.nbytes for c in columns.values())
    total = sum(rows.values())
    return {"rows": rows, **pixel_spec(image_processor),
            "storage": "uint8, channels first, after resize and center crop; the collator rescales "
                       "and normalizes",
            "mib_per_1000_images": round(stored / max(total, 1) * 1000 / 2**20, 2),
            "seconds_per_1000_images": round(seconds / max(total, 1) * 1000, 2)}


def tokenize(data_dir: str | Path, plan: Plan, output: str | Path,
             cache_root: str = DEFAULT_CACHE_ROOT) -> dict:
    """Tokenize the prepared splits into `output`, through the cache. Returns the info dict,
    whose `cache_uri` names the cache entry: a complete tokenized folder of its own."""
    check_output(output)
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    tokenizer, image_processor = load_processors(plan)
    identity = tokenizer_identity(tokenizer, image_processor)
    extension = plan.tokenizer_extension if plan.architecture == "sequence-classification" else "off"
    key = cache_key(manifest["split_fingerprints"], identity, plan.max_length, extension)
    fs, root = remote.url_to_fs(cache_root if "://" in cache_root else str(Path(cache_root).expanduser()))
    entry = f"{root.rstrip('/')}/tokenized/{key}"
    # Everything train and evaluate need travels with the entry, so they can read it alone.
    info = {"cache_key": key, "model_type": plan.model_type, "tokenizer": identity,
            "max_length": plan.max_length, "labels": manifest["labels"],
            "class_weights": manifest["class_weights"], "data_fingerprint": manifest["fingerprint"],
            "loss_weights": manifest["rebalance"]["loss_weights"],
            "learning_rate_scale": manifest["rebalance"]["learning_rate_scale"],
            "sources": manifest["sources"], "splits": manifest["splits"],
            "preprocessing_version": PREPROCESSING_VERSION}
    with atomic_output_dir(output) as tmp:
        try:
            clean_abandoned(fs, entry)
            found = read_published(fs, entry)
        except Exception as exc:  # noqa: BLE001 - each storage client raises its own types
            if (why := remote.failure(exc)) is None:
                raise
            raise CockatooError(f"cannot read the tokenization cache {cache_root}: {why}") from None
        if found.entry is not None:
            log.info("tokenize: cache hit %s in %s", key, cache_root)
            published, stats = found.entry, found.entry.meta
            fs.get(fs._strip_protocol(published.uri) + "/", str(tmp) + "/", recursive=True)
        else:
            if found.problem:
                log.warning("tokenize: cache entry not usable, rebuilding: %s", found.problem)
            log.info("tokenize: cache miss %s; tokenizing with %s", key, identity)
            stats = _build_entry(data_dir, tokenizer, image_processor, plan.max_length, tmp, extension)
            write_json(tmp / INFO, {**info, **stats})
            try:
                published = publish(fs, entry, tmp, stats, found.next_generation)
            except Exception as exc:  # noqa: BLE001
                if (why := remote.failure(exc)) is None:
                    raise
                raise CockatooError(f"cannot write tokenization cache entry {entry}: {why}") from None
        if any(stats["truncated"].values()):
            log.info("tokenize: texts truncated at %d tokens: %s", plan.max_length, stats["truncated"])
        if "tokenizer_extension" in stats:
            before = stats["tokenizer_extension"]["diagnostics_before"]["overall"]["unknown_token_share"]
            log.info("tokenize: %d characters the tokenizer did not know added as tokens; unknown tokens "
                     "%.1f%% -> %.1f%%", len(stats["tokenizer_extension"]["added_tokens"]), 100 * before,
                     100 * stats["diagnostics"]["overall"]["unknown_token_share"])
        for warning in diagnostic_warnings(stats["diagnostics"]):
            log.warning("tokenize: %s", warning)
        if "images" in stats:
            log.info("tokenize: pixels cached for %s images (%.1f MiB per 1,000)",
                     stats["images"]["rows"], stats["images"]["mib_per_1000_images"])
        elif "images" in manifest and not plan.reads_images:
            log.warning("tokenize: %s reads text only; the data's images are not used", plan.model_type)
        info.update(stats, cache_hit=found.entry is not None, cache_uri=published.uri)
        write_json(tmp / INFO, info)
        _check_output(tmp, manifest, published.uri)
    return info


def _check_output(folder: Path, manifest: dict, source: str) -> None:
    """The output loads and holds the manifest's rows, or the step fails: never a success
    that train would then reject."""
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(str(folder))
        rows = {s: len(loaded[s]) for s in SPLITS}
    except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
        raise CockatooError(f"tokenized data from {source} does not load: "
                            f"{str(exc).splitlines()[0]}") from None
    expected = {s: manifest["splits"][s]["rows"] for s in SPLITS}
    if rows != expected:
        raise CockatooError(f"tokenized data from {source} holds {rows} rows, the data manifest {expected}")


def load_tokenized(path: str | Path):
    """The tokenized DatasetDict and its info."""
    from datasets import load_from_disk

    path = Path(path)
    info = read_json(path / INFO, "tokenized info")
    try:
        return load_from_disk(str(path)), info
    except FileNotFoundError as exc:
        raise CockatooError(f"tokenized data {path} is incomplete: {exc}") from None

