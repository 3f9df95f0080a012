"""Classify new rows with a trained model: a model folder, a folder in a bucket, or a
registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`).

Rows are tokenized at the model's inference max length, sorted by length and padded per batch
(similar lengths pad little), and scored under inference mode; results come back in input order.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cockatoo_lib.data.clip_images import PIXEL_COLUMN
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.metrics import sigmoid
from cockatoo_lib.storage import remote
from cockatoo_lib.storage.fileio import check_output
from cockatoo_lib.training.collate import PaddingCollator
from cockatoo_lib.training.model_folder import MODEL_MANIFEST, read_model_manifest

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
# Rows tokenized at once: a tokenizer's encodings of 100k rows of posts take over a GiB; length-sorting
# 16k rows pads about as little as sorting them all (B12 measures the memory).
TOKENIZE_ROWS = 16_384
PROBABILITY_PREFIX = "p_"  # one output column per label: p_<label>
LABELS_COLUMN = "labels"  # the labels at the model's thresholds, comma-separated
PREVIEW_ROWS = 5  # rows the command line shows
# The forms a model can score in: as trained, and the reduced ones a CPU may serve once the gate
# accepts what they cost (Classifier.in_form).
FORMS = ("fp32", "bf16", "int8")


def native_forms() -> list[str]:
    """The reduced forms this CPU scores faster than as trained, preferred first: bf16 where the
    CPU has bfloat16 instructions (AVX512-BF16, AMX: about int8's speed, B11, with probabilities
    moved ~25x less, B7), then int8. Elsewhere bf16 is emulated, slower than fp32."""
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return ["bf16", "int8"] if bf16 else ["int8"]


class Classifier:
    """A trained model ready to score texts (and images, for CLIP)."""

    def __init__(self, model_dir: str | Path, *, keep_alive=None, device: str | None = None):
        from transformers import AutoTokenizer

        from cockatoo_lib.training.models import load_trained_model

        self.model_dir = Path(model_dir)
        self.manifest = read_model_manifest(self.model_dir)
        self.labels: list[str] = self.manifest["labels"]
        self.thresholds = np.array([self.manifest["thresholds"][x] for x in self.labels])
        self.max_length = int(self.manifest.get("inference_max_length") or self.manifest["max_length"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = load_trained_model(self.model_dir, self.manifest["architecture"]).to(self.device).eval()
        self.image_processor = None
        if self.manifest["architecture"] == "clip":
            from cockatoo_lib.data.clip_images import load_image_processor

            self.image_processor = load_image_processor(str(self.model_dir))
        # The char n-gram partner the model ships combined with, if any (it reads the text only).
        self.combination = self.manifest.get("combination")
        self.partner = None
        if self.combination:
            from cockatoo_lib.evaluation.baseline import CharNgramModel

            self.partner = CharNgramModel.load(self.model_dir, self.labels)
        self._keep_alive = keep_alive  # the temporary folder a downloaded model lives in
        self.form = "fp32"  # see in_form

    @classmethod
    def load(cls, uri: str | Path, registry_uri: str | None = None, device: str | None = None) -> Classifier:
        """A model folder, an fsspec URI of one (gs://, s3://), or models:/NAME@ALIAS."""
        uri = str(uri)
        if uri.startswith("models:/"):
            from cockatoo_lib.release.model_registry import open_registry

            work = tempfile.TemporaryDirectory(prefix="cockatoo-model-")
            folder = open_registry(registry_uri).download(uri, work.name)
            return cls(folder, keep_alive=work, device=device)
        if "://" in uri:
            work = tempfile.TemporaryDirectory(prefix="cockatoo-model-")
            return cls(_download_folder(uri, Path(work.name) / "model"), keep_alive=work, device=device)
        if not (Path(uri) / MODEL_MANIFEST).is_file():
            raise CockatooError(f"{uri} is not a cockatoo model folder: it has no {MODEL_MANIFEST}")
        return cls(uri, device=device)

    def in_form(self, form: str) -> Classifier:
        """This model in one of FORMS: "fp32" is itself; "bf16" a copy with weights and activations
        in bfloat16; "int8" a copy whose linear layers hold int8 weights and quantize their inputs
        per batch (PyTorch's dynamic quantization). The reduced forms run on the CPU, faster where
        it has instructions for them (native_forms), and move the scores a little: the gate
        measures what that costs (release.gate.serving_check)."""
        import copy
        import warnings

        if form not in FORMS:
            raise CockatooError(f"unknown model form {form!r}; one of: {', '.join(FORMS)}")
        if form == "fp32":
            return self
        if self.device.type != "cpu":
            raise CockatooError(f"{form} scoring runs on the CPU; this model is on {self.device}")
        reduced = copy.copy(self)
        reduced.form = form
        if form == "bf16":
            reduced.model = copy.deepcopy(self.model).to(torch.bfloat16)  # CLIP casts its pixels
            return reduced
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao; the pinned torch has it.
            warnings.simplefilter("ignore")
            reduced.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear},
                                                                   dtype=torch.qint8)
        return reduced

    def predict_proba(self, texts: list[str], images: list[bytes | None] | None = None,
                      batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                      max_batch_tokens: int | None = None, pixels: list[bytes | None] | None = None
                      ) -> np.ndarray:
        """Probabilities, one row per text and one column per label (self.labels order). With
        `max_batch_tokens`, a batch also ends where its padded size would pass that many tokens.
        `pixels`, in place of `images`: what `pixels(images)` gave (the server decodes each
        request's images in that request's thread, not in the batch's)."""
        if len(texts) > TOKENIZE_ROWS:  # memory flat in the rows: a block's encodings at a time
            def block(items, i):
                return None if items is None else items[i:i + TOKENIZE_ROWS]

            return np.concatenate([
                self.predict_proba(block(texts, i), block(images, i), batch_size, progress, max_batch_tokens,
                                   block(pixels, i))
                for i in range(0, len(texts), TOKENIZE_ROWS)])
        texts = ["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in texts]
        if not texts:
            return np.zeros((0, len(self.labels)))
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        columns = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        if pixels is None:
            pixels = self.pixels(images, len(texts))
        cuda = self.device.type == "cuda"
        collator = PaddingCollator(self.tokenizer.pad_token_id or 0, pad_to_multiple_of=8 if cuda else 1,
                                   pixels=self.pixel_spec, max_length=self.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        batches = length_batches([lengths[i] for i in order], batch_size, max_batch_tokens)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            for start, end in tqdm(batches, desc="predict", unit="batch", disable=not progress):
                idx = order[start:end]
                rows = [{**{k: encoded[k][i] for k in columns},
                         **({PIXEL_COLUMN: pixels[i]} if pixels is not None else {})} for i in idx]
                batch = {k: v.to(self.device, non_blocking=cuda) for k, v in collator(rows).items()}
                out[idx] = sigmoid(self.model(**batch).logits.float().cpu().numpy())
        if self.partner is not None:
            from cockatoo_lib.evaluation.baseline import combine

            out = combine(out, self.partner.predict_proba(texts), self.combination["transformer_weight"])
        return out.astype(np.float32)

    def predict(self, texts: list[str], images: list[bytes | None] | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict]:
        """Per text: each label's probability, and the labels at the model's thresholds."""
        probs = self.predict_proba(texts, images, batch_size)
        return [{"probabilities": dict(zip(self.labels, map(float, row))),
                 "labels": [x for x, hit in zip(self.labels, row >= self.thresholds) if hit]}
                for row in probs]

    @property
    def pixel_spec(self) -> dict | None:
        if self.image_processor is None:
            return None
        from cockatoo_lib.data.clip_images import pixel_spec

        return pixel_spec(self.image_processor)

    def pixels(self, images, n: int, checked: bool = False) -> list[bytes | None] | None:
        """The model's input pixels of each image (None: no image); `checked`: check_image has
        passed them already."""
        if images is None or self.image_processor is None:
            if images is not None:
                raise CockatooError(f"the {self.manifest['model_type']} model at {self.model_dir} "
                                    "reads text only; leave out the image column")
            return None
        if len(images) != n:
            raise CockatooError(f"{len(images)} images for {n} texts")
        from cockatoo_lib.data.clip_images import check_image, to_pixels

        for i, data in enumerate(images):
            if not checked and data is not None and (why := check_image(data)):
                raise CockatooError(f"image of row {i}: {why}")
        return to_pixels(list(images), self.image_processor)


def length_batches(sorted_lengths: list[int], batch_size: int, max_tokens: int | None = None
                   ) -> list[tuple[int, int]]:
    """(start, end) of each batch over lengths sorted ascending: at most `batch_size` rows, and
    with `max_tokens`, at most that many tokens once padded to the batch's longest (a single
    longer row is a batch of its own). Padding costs as much as text: on a CPU, 32 texts of
    mixed lengths in one batch score slower than one at a time."""
    batches, start = [], 0
    for end in range(1, len(sorted_lengths) + 1):
        rows = end - start
        if rows > batch_size or (max_tokens and rows > 1 and rows * sorted_lengths[end - 1] > max_tokens):
            batches.append((start, end - 1))
            start = end - 1
    if start < len(sorted_lengths):
        batches.append((start, len(sorted_lengths)))
    return batches


def _download_folder(uri: str, dest: Path) -> Path:
    fs, path = remote.url_to_fs(uri)
    try:
        if not fs.exists(f"{path.rstrip('/')}/{MODEL_MANIFEST}"):
            raise CockatooError(f"{uri} is not a cockatoo model folder: it has no {MODEL_MANIFEST}")
        fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    except CockatooError:
        raise
    except Exception as exc:  # noqa: BLE001 - each storage client raises its own types
        raise CockatooError(f"cannot download the model {uri}: {remote.failure(exc) or exc}") from None
    return dest


def predict_file(model: str, input_uri: str, output: str | Path, text_column: str = "text",
                 image_column: str | None = None, registry_uri: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Score a CSV, JSONL or Parquet file; write its rows with p_<label> and `labels` columns,
    in a format named by the output's suffix, in one step (nothing on failure)."""
    from cockatoo_lib.data.tables import read_table, table_format

    output = str(output)
    out_format = table_format(output, "predict output")
    _check_new_output(output)
    frame = read_table(input_uri, "predict input", text_column=text_column)
    classifier = Classifier.load(model, registry_uri)
    result, hits = _scored(classifier, frame, input_uri, text_column, image_column, batch_size, progress=True)
    _write_table(result, output, out_format)
    shown = frame[text_column].fillna("").astype(str)[:PREVIEW_ROWS]
    preview = list(zip(shown, result[LABELS_COLUMN][:PREVIEW_ROWS]))
    return {"rows": len(result), "labels": classifier.labels, "output": output, "preview": preview,
            "positives": dict(zip(classifier.labels, hits.sum(axis=0).tolist()))}


def _scored(classifier: Classifier, frame: pd.DataFrame, input_uri: str, text_column: str,
            image_column: str | None, batch_size: int, progress: bool = False
            ) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows with p_<label> and `labels` columns (the image column left out), and the hits."""
    for kind, column in (("text", text_column), ("image", image_column)):
        if column is not None and column not in frame.columns:
            raise CockatooError(f"predict input {input_uri}: {kind} column {column!r} not found; "
                                f"columns: {', '.join(map(str, frame.columns))}")
    images = None
    if image_column is not None:  # paths, URIs, URLs or bytes, as a data config's image column
        from cockatoo_lib.data.clip_images import ImageStore, load_image_column
        from cockatoo_lib.data.prepare import _parent

        with ImageStore() as store:
            ids = load_image_column(frame[image_column], _parent(input_uri), "predict input", input_uri,
                                    image_column, "error", store).ids
            images = store.take(ids).to_pylist()
    probs = classifier.predict_proba(frame[text_column].tolist(), images, batch_size, progress=progress)
    result = frame.drop(columns=[image_column] if image_column else [])
    for j, label in enumerate(classifier.labels):
        result[f"{PROBABILITY_PREFIX}{label}"] = probs[:, j]
    hits = probs >= classifier.thresholds
    result[LABELS_COLUMN] = [",".join(x for x, h in zip(classifier.labels, row) if h) for row in hits]
    return result, hits


def _check_new_output(output: str) -> None:
    """An existing output is never replaced, wherever it is: a local path, file://, or a bucket."""
    if "://" not in output:
        check_output(output)
        return
    fs, path = remote.url_to_fs(output)
    if "file" in fs.protocol:
        check_output(path)
    elif fs.exists(path):
        raise CockatooError(f"output {output} already exists; remove it or choose another")


def _write_table(frame: pd.DataFrame, output: str, fmt: str) -> None:
    """Write the table in one step, and only where nothing is yet: created, never replaced, on
    local disk (a hard link) and in a bucket (a create-only write) alike."""
    import io

    from cockatoo_lib.storage.publish import create_only

    buffer = io.BytesIO()
    {"csv": lambda f: frame.to_csv(f, index=False),
     "jsonl": lambda f: frame.to_json(f, orient="records", lines=True, force_ascii=False),
     "json": lambda f: frame.to_json(f, orient="records", force_ascii=False),
     "parquet": lambda f: frame.to_parquet(f, index=False)}[fmt](buffer)
    fs, path = remote.url_to_fs(output)  # a plain path is local disk's
    if "file" in fs.protocol:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        create_only(fs, path, buffer.getvalue())
    except FileExistsError:
        raise CockatooError(f"output {output} appeared while predicting (another run?); it is left as it "
                            "was and nothing was written") from None
