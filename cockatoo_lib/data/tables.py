"""Reading a table (CSV, JSON lines, JSON, Parquet; compressed too; local or any fsspec URI) whole
or a chunk at a time, with one-line errors that name the file."""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator

import pandas as pd
from fsspec.utils import infer_compression

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.storage import remote

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def open_read(uri: str, what: str):
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
    if is_compressed(name):
        name = posixpath.splitext(name)[0]
    suffix = posixpath.splitext(name)[1]
    fmt = fmt or FORMATS.get(suffix)
    if fmt is None:
        raise CockatooError(
            f"{what}: cannot tell the format of {uri} from its suffix "
            f"{suffix or '(none)'}; use one of {', '.join(FORMATS)} or set 'format'")
    return fmt


def is_compressed(uri: str) -> bool:
    return infer_compression(uri.lower()) is not None


def read_table(uri: str, what: str, fmt: str | None = None, text_column: str | None = None) -> pd.DataFrame:
    """A whole table; an empty one is an error."""
    chunks = list(read_chunks(uri, what, None, fmt, text_column))
    if not chunks:
        raise CockatooError(f"{what}: {uri} has no rows")
    return chunks[0]


def read_chunks(uri: str, what: str, rows: int | None, fmt: str | None = None,
                text_column: str | None = None) -> Iterator[pd.DataFrame]:
    """A table's rows, at most `rows` at a time (None: all at once), texts kept as written; an empty
    table yields nothing. A JSON array has no streaming reader: it comes whole."""
    import pyarrow.parquet as pq

    fmt = table_format(uri, what, fmt)
    with open_read(uri, what) as handle:
        try:
            if fmt == "csv":  # texts stay as written: no reader may turn "007" or "1e5" into a number
                texts_as_written = {text_column: str} if text_column else None
                chunks = pd.read_csv(handle, dtype=texts_as_written, chunksize=rows)
            elif fmt == "jsonl":
                chunks = pd.read_json(handle, lines=True, dtype=False, chunksize=rows)
            elif fmt == "json":
                chunks = [pd.read_json(handle, dtype=False)]
            else:  # Parquet seeks to its footer: a compressed stream (zstd, bz2) is read into memory first
                source = io.BytesIO(handle.read()) if is_compressed(uri) else handle
                if rows is None:
                    chunks = [pd.read_parquet(source)]
                else:
                    chunks = (b.to_pandas() for b in pq.ParquetFile(source).iter_batches(batch_size=rows))
            if rows is None and fmt in ("csv", "jsonl"):  # the readers give the frame itself
                chunks = [chunks]
            yield from (chunk for chunk in chunks if len(chunk))
        except pd.errors.EmptyDataError:
            return
        except Exception as exc:  # readers raise many types; all mean "not this format"
            if isinstance(exc, CockatooError):
                raise
            if remote.is_timeout(exc):
                raise CockatooError(f"{what}: cannot read {uri}: {remote.timeout_hint()}") from None
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CockatooError(f"{what}: cannot read {uri} as {fmt}: {first}") from None
