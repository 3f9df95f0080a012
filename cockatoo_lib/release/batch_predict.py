"""Scoring a backlog: `cockatoo predict --output FOLDER/` reads its input in chunks and writes a
Parquet shard per chunk as it goes, so memory stays flat in the number of rows.

- Input: a CSV, JSONL or Parquet file (each maybe compressed), or a folder or glob of them, read
  in order (file names sorted), `shard_rows` rows at a time (Parquet: its record batches of at
  most that many).
- Output: `part-NNNNN.parquet` per chunk, each written create-only in one step, with the chunk's
  rows and per-label positives in its footer; `manifest.json` last, once every shard is there
  (rows, shards, labels, positives, the model, seconds). A folder with a manifest is finished and
  never written again.
- Resume: run again with the same arguments, a killed or preempted run scores only the chunks
  whose shard is missing; a shard that is there is checked (its footer's rows match the chunk's)
  and kept. A shard that does not match says so and stops: the input changed since.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time

import pandas as pd

from cockatoo_lib.data.tables import read_chunks
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.storage import remote

log = logging.getLogger(__name__)

SHARD_ROWS = 100_000
MANIFEST = "manifest.json"
STATS_KEY = b"cockatoo"  # the shard footer's key-value metadata: {"rows", "positives"}


def is_folder_output(output: str) -> bool:
    """A folder of shards: an output that ends with '/' or names no table format."""
    from cockatoo_lib.data.tables import FORMATS

    name = output.lower().rstrip("/")
    return output.endswith("/") or not any(name.endswith(s) or f"{s}." in posixpath.basename(name)
                                           for s in FORMATS)


def input_files(input_uri: str) -> list[str]:
    """The files to read, in order: the file, a folder's tables, or a glob's matches."""
    from cockatoo_lib.data.tables import FORMATS

    fs, path = remote.url_to_fs(input_uri)
    try:
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if any(s in posixpath.basename(p).lower() for s in FORMATS)]
        else:
            return [input_uri]
    except Exception as exc:  # noqa: BLE001 - each storage client raises its own types
        raise CockatooError(f"predict input: cannot list {input_uri}: {remote.failure(exc) or exc}") from None
    if not found:
        raise CockatooError(f"predict input: {input_uri} matches no CSV, JSONL or Parquet file")
    return [fs.unstrip_protocol(p) if "://" in input_uri else p for p in sorted(found)]


def parquet_rows(files: list[str]) -> int | None:
    """The rows of an input of plain Parquet files, from their footers: the progress bar's total,
    which gives it an ETA. None for other inputs (a CSV's rows are known only once read), or where
    a footer cannot be read (reading the file says why)."""
    import pyarrow.parquet as pq

    from cockatoo_lib.data.tables import is_compressed, open_read, table_format

    if not all(table_format(f, "predict input") == "parquet" and not is_compressed(f) for f in files):
        return None
    try:
        total = 0
        for uri in files:
            with open_read(uri, "predict input") as handle:
                total += pq.read_metadata(handle).num_rows
        return total
    except Exception:  # noqa: BLE001 - only the bar's total is lost
        return None


def finished_already(output: str) -> CockatooError:
    return CockatooError(f"output {output} is finished already (it has {MANIFEST}); remove it or choose "
                         "another")


def predict_folder(model: str, input_uri: str, output: str, text_column: str = "text",
                   image_column: str | None = None, registry_uri: str | None = None,
                   batch_size: int | None = None, shard_rows: int = SHARD_ROWS,
                   files: list[str] | None = None, finished_is_done: bool = False) -> dict:
    """Score `input_uri` (or the given `files` of it) into the folder `output`. A finished
    folder is refused; with `finished_is_done` (a retried pipeline shard) one finished by the same
    model on the same files is this call's result instead. `batch_size`: predict's default where None."""
    from tqdm.auto import tqdm

    # Here, not above: the score pipeline's plan and finish steps read this module's manifests and
    # file lists, and would otherwise import torch and transformers for nothing (seconds per pod).
    from cockatoo_lib.release.predict import DEFAULT_BATCH_SIZE, Classifier, _scored

    start = time.perf_counter()
    fs, root = remote.url_to_fs(output.rstrip("/"))
    files = files or input_files(input_uri)
    if fs.exists(f"{root}/{MANIFEST}"):
        done = json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
        if finished_is_done and done.get("model") == model and done.get("files") == files:
            return {**done, "output": output, "preview": []}
        raise finished_already(output)
    classifier = Classifier.load(model, registry_uri)  # once: every shard scores with this version
    fs.makedirs(root, exist_ok=True)
    positives = dict.fromkeys(classifier.labels, 0)
    shards = scored = rows = 0
    preview: list[tuple[str, str]] = []
    with tqdm(desc="predict", unit="row", unit_scale=True, total=parquet_rows(files)) as progress:
        for uri in files:
            for frame in read_chunks(uri, "predict input", shard_rows, text_column=text_column):
                shard = f"{root}/part-{shards:05d}.parquet"
                stats = _kept_stats(fs, shard, len(frame))
                if stats is None:
                    result, hits = _scored(classifier, frame, uri, text_column, image_column,
                                           batch_size or DEFAULT_BATCH_SIZE)
                    stats = {"rows": len(result), "positives": dict(zip(classifier.labels,
                                                                        hits.sum(axis=0).tolist()))}
                    _write_shard(fs, shard, result, stats)
                    scored += len(result)
                    if len(preview) < 5:
                        preview += list(zip(result[text_column].fillna("").astype(str),
                                            result["labels"]))[:5 - len(preview)]
                for label, n in stats["positives"].items():
                    positives[label] += n
                shards, rows = shards + 1, rows + len(frame)
                progress.update(len(frame))
    if rows == 0:
        raise CockatooError(f"predict input {input_uri} has no rows")
    manifest = {"rows": rows, "shards": shards, "labels": classifier.labels, "positives": positives,
                "model": model, "model_dir": str(classifier.model_dir), "rows_scored_by_this_run": scored,
                "seconds": round(time.perf_counter() - start, 1), "files": files}
    from cockatoo_lib.storage.publish import create_only

    create_only(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    log.info("predict: %d rows in %d shards under %s (%d scored by this run)", rows, shards, output, scored)
    return {**manifest, "output": output, "preview": preview}


def _kept_stats(fs, shard: str, rows: int) -> dict | None:
    """A shard an earlier run wrote, checked against the chunk it is of; None if there is none."""
    import pyarrow.parquet as pq

    if not fs.exists(shard):
        return None
    try:
        with fs.open(shard, "rb") as handle:
            metadata = pq.read_metadata(handle)
        stats = json.loads(metadata.metadata[STATS_KEY])
    except Exception as exc:  # noqa: BLE001 - a damaged file of any kind
        raise CockatooError(f"predict output {shard} cannot be read ({type(exc).__name__}); remove it "
                            "and run again") from None
    if metadata.num_rows != rows or stats.get("rows") != rows:
        raise CockatooError(f"predict output {shard} holds {metadata.num_rows} rows where this chunk of the "
                            f"input has {rows}: the input changed since it was written; use a new output")
    return stats


def _write_shard(fs, shard: str, frame: pd.DataFrame, stats: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cockatoo_lib.storage.publish import create_only

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    try:
        create_only(fs, shard, buffer.getvalue())  # whole or not at all: a kill leaves no half shard
    except FileExistsError:
        raise CockatooError(f"predict output {shard} appeared while this run scored it (another run on the "
                            "same output?); run again to check it") from None
