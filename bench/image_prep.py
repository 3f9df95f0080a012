"""B6 images for CLIP: photo-sized JPEGs through prepare (fetch, decode check) and tokenize
(CLIP-L's image processor, cached uint8 pixels): seconds and disk per 1,000 images, and the
per-batch cost of collating cached pixels against decoding the JPEGs each time."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

KEY, TITLE = "b6", "B6 images"


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=1000, help="B6 images")


def run(args) -> dict:
    return bench_images(args.images, args.repeats)


def photo_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG that encodes like a photo: smooth regions plus sensor-like noise, quality 85."""
    import io

    from PIL import Image

    w, h = size
    smooth = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(smooth).astype(np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


PHOTO_SIZES = [(640, 480), (1024, 768), (480, 640), (800, 800), (1280, 720)]


def _clip_preprocessor_folder(folder: Path) -> Path:
    """CLIP-L/14's preprocessing without its weights (no network here): the demo model's
    tokenizer and CLIPImageProcessor's defaults, which are CLIP-L/14's (224, bicubic, its mean
    and std)."""
    from transformers import AutoTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    from cockatoo_lib.plan.catalogue import default_base_model, get_spec

    AutoTokenizer.from_pretrained(default_base_model(get_spec("minilm"))).save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)
    return folder


def bench_images(images: int, repeats: int) -> dict:
    import pandas as pd
    import torch

    from cockatoo_lib.data.clip_images import collate_pixels, load_image_processor, to_pixels
    from cockatoo_lib.data.prepare import load_data_config, prepare
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import load_tokenized, tokenize

    rng = np.random.default_rng(0)
    prep, tok, per_image_disk = [], [], None
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "img").mkdir()
        jpeg_bytes = 0
        for i in range(images):
            data = photo_jpeg(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)])
            (work / "img" / f"{i}.jpg").write_bytes(data)
            jpeg_bytes += len(data)
        pd.DataFrame({"text": [f"post {i}" for i in range(images)],
                      "image": [f"img/{i}.jpg" for i in range(images)],
                      "label": np.arange(images) % 2}).to_csv(work / "posts.csv", index=False)
        (work / "data.yaml").write_text("labels: [scam]\nsources: [{name: s, path: posts.csv, "
                                        "image_column: image, labels: {scam: label}}]\n")
        folder = _clip_preprocessor_folder(work / "clip")
        plan = resolve_plan("clip-vit", {"base_model": str(folder)})
        for i in range(repeats):
            start = time.perf_counter()
            prepare(load_data_config(str(work / "data.yaml")), work / f"data{i}")
            prep.append(time.perf_counter() - start)
            start = time.perf_counter()
            info = tokenize(work / f"data{i}", plan, work / f"tok{i}", str(work / f"cache{i}"))
            tok.append(time.perf_counter() - start)
            entry = work / f"cache{i}" / "tokenized" / info["cache_key"]
            per_image_disk = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / images
        # Per batch of the registry's 16: collate cached pixels, or decode and resize JPEGs.
        processor = load_image_processor(str(folder))
        train = load_tokenized(work / "tok0")[0]["train"]
        spec, batch = info["images"], 16
        cached = [train[j]["pixel_values"] for j in range(batch)]
        jpegs = [(work / "img" / f"{j}.jpg").read_bytes() for j in range(batch)]
        collate_s, decode_s = [], []
        for _ in range(repeats * 5):
            start = time.perf_counter()
            collate_pixels(cached, spec)
            collate_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            pixels = to_pixels(jpegs, processor)
            collate_pixels(pixels, spec)
            decode_s.append(time.perf_counter() - start)
    per_1000 = 1000 / images
    return {"images": images, "repeats": repeats, "threads": torch.get_num_threads(),
            "jpeg_kib_mean": jpeg_bytes / images / 1024, "sizes": [f"{w}x{h}" for w, h in PHOTO_SIZES],
            "prepare_s_per_1000": statistics.median(prep) * per_1000,
            "tokenize_s_per_1000": statistics.median(tok) * per_1000,
            "cached_mib_per_1000": info["images"]["mib_per_1000_images"],
            "entry_mib_per_1000": per_image_disk * 1000 / 2**20,
            "jpeg_mib_per_1000": jpeg_bytes * per_1000 / 2**20,
            "collate_ms_per_batch": statistics.median(collate_s) * 1000,
            "decode_ms_per_batch": statistics.median(decode_s) * 1000}


def section(m: dict, b6: dict) -> list[str]:
    return [
        "## B6: images for CLIP",
        "",
        f"{b6['images']:,} generated photo-like JPEGs ({', '.join(b6['sizes'])}; mean "
        f"{b6['jpeg_kib_mean']:.0f} KiB), read from local disk, CLIP-L/14's image processor "
        f"(PIL backend, 224 × 224), {b6['repeats']} repeats, {m['cores']} cores. Per 1,000 images:",
        "",
        "| step | seconds | disk |",
        "|---|---|---|",
        f"| prepare (read, decode check, write Parquet) | {b6['prepare_s_per_1000']:.1f} | "
        f"{b6['jpeg_mib_per_1000']:.0f} MiB of JPEGs |",
        f"| tokenize (decode, resize, crop; write the cache entry) | {b6['tokenize_s_per_1000']:.1f} | "
        f"{b6['entry_mib_per_1000']:.0f} MiB entry, of which pixels {b6['cached_mib_per_1000']:.1f} MiB |",
        "",
        f"Per batch of 16 at training time: **{b6['collate_ms_per_batch']:.1f} ms** to collate cached "
        f"uint8 pixels (rescale and normalize) against **{b6['decode_ms_per_batch']:.0f} ms** to decode "
        "and resize the JPEGs instead "
        f"(ratio {b6['decode_ms_per_batch'] / b6['collate_ms_per_batch']:.0f}×). Float32 pixels would take "
        f"{4 * b6['cached_mib_per_1000']:.0f} MiB per 1,000 images.",
    ]
