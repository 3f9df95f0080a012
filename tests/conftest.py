"""Shared fixtures: tiny random models built from configs, a locally trained tokenizer, and
small data. Nothing here touches the network."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import BIN, free_port, make_image, serve, without_coverage, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread: `make test` runs three workers on two cores, where more would fight, and a
# process forked from a test (helpers.forked) hangs in OpenMP if its parent had a thread pool.
os.environ["OMP_NUM_THREADS"] = "1"
# gcsfs otherwise probes each bucket over gRPC, which the storage emulator does not serve, and
# waits 60 s for it. gcsfs reads this when first imported, so it is set before any test runs.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The one local pipeline run (test_pipeline.local_run: a minute and more) starts first, the
    rest in pytest-randomly's order: a worker that started it last would keep the other waiting."""
    items.sort(key=lambda item: "local_run" not in item.fixturenames)


SAMPLE_CONFIG = Path(__file__).parents[1] / "cockatoo_lib" / "presets" / "sample.yaml"


def build_tokenizer(texts: list[str], vocab_size: int = 600):
    """A WordPiece tokenizer built here from `texts`, wrapped as a BERT-style fast tokenizer: every
    character seen (alone and as a continuation), then the most frequent words, ties in word
    order. Built, not trained: tokenizers' WordPieceTrainer breaks ties between equally frequent
    pieces differently from run to run, so every model trained on its ids differed too (and a
    test comparing two runs' models failed at random)."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    words = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(w) > 1]
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _sample_texts() -> list[str]:
    import pandas as pd

    base = SAMPLE_CONFIG.parent / "sample"
    return (pd.read_csv(base / "jigsaw.csv")["comment_text"].tolist()
            + pd.read_csv(base / "toxicchat.csv")["user_input"].tolist()
            + pd.read_json(base / "phishing.json")["text"].tolist())


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def build_tiny_model(model_type: str, tokenizer, folder: Path) -> Path:
    """Save a tiny random base model for `model_type` with `tokenizer` into `folder`."""
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPModel,
        DebertaV2Config,
        DebertaV2Model,
        ModernBertConfig,
        ModernBertModel,
    )

    torch.manual_seed(0)
    vocab = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
               eos_token_id=tokenizer.sep_token_id)
    if model_type == "minilm":  # MiniLM is a BERT
        model = BertModel(BertConfig(vocab_size=vocab, max_position_embeddings=512, **TINY, **ids))
    elif model_type == "deberta":
        model = DebertaV2Model(DebertaV2Config(vocab_size=vocab, max_position_embeddings=512,
                                               **TINY, **ids))
    elif model_type == "modernbert":
        model = ModernBertModel(ModernBertConfig(
            vocab_size=vocab, max_position_embeddings=1024, global_attn_every_n_layers=2,
            local_attention=16, sep_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id, **TINY, **ids))
    elif model_type == "clip-vit":
        model = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=vocab, max_position_embeddings=77, **TINY, **ids),
            vision_config=dict(image_size=224, patch_size=32, **TINY),
            projection_dim=24))
        from transformers.models.clip import CLIPImageProcessorPil

        CLIPImageProcessorPil().save_pretrained(folder)  # CLIP's defaults: 224 x 224
    else:
        raise ValueError(model_type)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `build` fills, built once per test run: the first worker (pytest-xdist) to ask
    builds it, the others wait for it and share it. Tests only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a build that failed left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


TINY_MODEL_TYPES = ("deberta", "modernbert", "clip-vit", "minilm")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """model_type -> folder of a tiny random base model with a local tokenizer (minilm's: a tiny
    BERT, for code under test that takes MiniLM's recipe, not for MiniLM's own weights)."""
    def build(root: Path) -> None:
        tokenizer = build_tokenizer(_sample_texts())
        for model_type in TINY_MODEL_TYPES:
            build_tiny_model(model_type, tokenizer, root / model_type)

    root = built_once(tmp_path_factory, "tiny-models", build)
    return {model_type: root / model_type for model_type in TINY_MODEL_TYPES}


def _prepared(tmp_path_factory, name: str, max_samples: int = 0) -> Path:
    from cockatoo_lib.data.prepare import load_data_config, prepare

    def build(root: Path) -> None:
        prepare(load_data_config(str(SAMPLE_CONFIG)), root / "data", max_samples=max_samples)

    return built_once(tmp_path_factory, name, build) / "data"


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The demo sample, prepared (all rows, seed 42)."""
    return _prepared(tmp_path_factory, "sample")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """400 rows of the sample: enough for every label, quick to train on."""
    return _prepared(tmp_path_factory, "small", max_samples=400)


@pytest.fixture(scope="session")
def image_data(tmp_path_factory):
    """240 rows, two thirds with an image (JPEG, PNG, grayscale, odd sizes), a third text-only,
    some captions longer than CLIP's 77 tokens; the label depends on text and image colour."""
    return built_once(tmp_path_factory, "images", _write_image_data)


def _write_image_data(root: Path) -> None:
    import pandas as pd

    from cockatoo_lib.data.prepare import load_data_config, prepare

    (root / "img").mkdir()
    rows = []
    for i in range(240):
        image = None
        if i % 3:
            fmt, mode = [("JPEG", "RGB"), ("PNG", "RGB"), ("JPEG", "L")][i % 3]
            image = f"img/{i}.{fmt.lower()}"
            make_image(root / image, i, size=(40 + 7 * (i % 50), 30 + 11 * (i % 30)), fmt=fmt, mode=mode)
        words = ("free money click now " if i % 2 else "a cat on a warm sofa ") * (1 + (i % 7) * 4)
        rows.append({"caption": f"post {i}: {words}", "scam": i % 2, "image": image})
    pd.DataFrame(rows).to_csv(root / "posts.csv", index=False)
    config = write_config(root, [{"name": "posts", "path": "posts.csv", "image_column": "image",
                                  "text_column": "caption", "labels": {"scam": "scam"}}], labels=["scam"])
    prepare(load_data_config(str(config)), root / "data")  # data.yaml, posts.csv, img/, and data/


# ------------------------------------------------------------------ storage emulators


@pytest.fixture(scope="session")
def _gcs_server():
    port = free_port()
    # The emulators and the MLflow server run none of the project's code: no coverage there.
    process = serve([str(BIN / "gcp-storage-emulator"), "start", "--host=127.0.0.1",
                     f"--port={port}", "--in-memory"], port, env=without_coverage())
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        import fsspec

        env.setenv("STORAGE_EMULATOR_HOST", endpoint)
        fsspec.filesystem("gs", token="anon").mkdir("cockatoo-data")
    yield endpoint
    process.kill()


@pytest.fixture
def gcs(_gcs_server, monkeypatch):
    """gcp-storage-emulator on loopback (one per test process); gcsfs finds it through
    STORAGE_EMULATOR_HOST, set for the test that asks for it only."""
    import fsspec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", _gcs_server)
    return fsspec.filesystem("gs", token="anon")


@pytest.fixture(scope="session")
def _s3_server():
    port = free_port()
    process = serve([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port,
                    env=without_coverage())
    yield f"http://127.0.0.1:{port}"
    process.kill()


@pytest.fixture
def s3(_s3_server, monkeypatch):
    """moto's S3 server on loopback (one per test process); s3fs finds it through
    AWS_ENDPOINT_URL, set for the test that asks for it only."""
    import fsspec

    for name, value in dict(AWS_ENDPOINT_URL=_s3_server, AWS_ACCESS_KEY_ID="testing",
                            AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch.setenv(name, value)
    fs = fsspec.filesystem("s3")
    if not fs.exists("cockatoo-data"):
        fs.mkdir("cockatoo-data")
    return fs


@pytest.fixture(scope="session")
def trained_run(tiny_models, small_data, tmp_path_factory):
    """A tiny DeBERTa trained on small_data with its evaluation, and a copy of it ("blind")
    whose thresholds of 1.0 flag nothing (every F1 0), with its own."""
    import json

    from cockatoo_lib.evaluation.evaluate import evaluate
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize
    from cockatoo_lib.training.model_folder import MODEL_MANIFEST, read_model_manifest
    from cockatoo_lib.training.trainer import train

    def build(root: Path) -> None:
        plan = resolve_plan("deberta", {"num_epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 1,
                                        "learning_rate": 1e-3, "dataloader_num_workers": 0,
                                        "base_model": str(tiny_models["deberta"])})
        tokenize(small_data, plan, root / "tok", cache_root=str(root / "cache"))
        train(root / "tok", plan, root / "model", data_dir=small_data)
        evaluate(root / "model", root / "tok", root / "eval")
        shutil.copytree(root / "model", root / "blind")
        manifest = json.loads((root / "blind" / MODEL_MANIFEST).read_text())
        manifest["thresholds"] = {label: 1.0 for label in manifest["thresholds"]}
        (root / "blind" / MODEL_MANIFEST).write_text(json.dumps(manifest))
        evaluate(root / "blind", root / "tok", root / "blind-eval")

    root = built_once(tmp_path_factory, "trained", build)
    labels = read_model_manifest(root / "model")["labels"]
    return {"data": small_data, "tok": root / "tok", "model": root / "model", "blind": root / "blind",
            "eval": root / "eval", "blind-eval": root / "blind-eval", "labels": labels}


@pytest.fixture(scope="session")
def trained_clip(tiny_models, image_data, tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP trained one epoch on image_data (texts with images), its tokenized data and
    the train manifest beside it."""
    import json

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize
    from cockatoo_lib.training.trainer import train

    def build(root: Path) -> None:
        plan = resolve_plan("clip-vit", {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1,
                                         "learning_rate": 1e-3, "dataloader_num_workers": 0,
                                         "base_model": str(tiny_models["clip-vit"])})
        tokenize(image_data / "data", plan, root / "tok", cache_root=str(root / "cache"))
        manifest = train(root / "tok", plan, root / "model", data_dir=image_data / "data")
        (root / "train.json").write_text(json.dumps(manifest))

    root = built_once(tmp_path_factory, "trained-clip", build)
    return {"model": root / "model", "tok": root / "tok",
            "manifest": json.loads((root / "train.json").read_text())}


@pytest.fixture(scope="session")
def data_parallel_run(tiny_models, tmp_path_factory) -> tuple[dict, Path]:
    """B9's measurement (bench/data_parallel.py) on 100 rows, its runs kept: `cockatoo train` with
    the tiny DeBERTa in one process and in two (torchrun, gloo), each with a checkpoint root. The
    suite's one two-process training: test_distributed checks what it trained, test_bench what B9
    makes of it."""
    import json

    from bench.data_parallel import bench_processes

    def build(folder: Path) -> None:
        b9 = bench_processes(rows=100, repeats=1, keep=folder, model_type="deberta",
                             base_model=str(tiny_models["deberta"]))
        (folder / "b9.json").write_text(json.dumps(b9))

    folder = built_once(tmp_path_factory, "data-parallel", build)
    b9 = json.loads((folder / "b9.json").read_text())
    return {**b9, "median": {int(n): m for n, m in b9["median"].items()}}, folder
