"""A trained model's folder: its manifest (cockatoo.json), what every reader of a model checks
first; and the check that tokenized data was made from the given prepared data."""

from __future__ import annotations

from pathlib import Path

from cockatoo_lib.data.prepare import read_manifest
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.storage.fileio import read_json

MODEL_MANIFEST = "cockatoo.json"


def read_model_manifest(model_dir: str | Path) -> dict:
    manifest = read_json(Path(model_dir) / MODEL_MANIFEST, "model manifest")
    for key in ("model_type", "architecture", "labels", "thresholds"):
        if key not in manifest:
            raise CockatooError(f"model manifest {Path(model_dir) / MODEL_MANIFEST} lacks {key!r}")
    return manifest


def check_same_data(tok_info: dict, tokenized_dir, data_dir) -> None:
    """Refuse tokenized data that was not made from the given prepared data."""
    if data_dir is None:
        return
    manifest = read_manifest(data_dir)
    if tok_info["labels"] != manifest["labels"] or tok_info["data_fingerprint"] != manifest["fingerprint"]:
        raise CockatooError(f"tokenized data {tokenized_dir} was not made from {data_dir} "
                            "(labels or data fingerprint differ); rerun tokenize")
