"""Batches of tokenized rows, as training, evaluation, predict and serving read them. Apart from
the trainer (and its transformers.Trainer, seconds to import), so that predict, evaluate and
the server start without it."""

from __future__ import annotations

import numpy as np
import torch

from cockatoo_lib.data.clip_images import PIXEL_COLUMN, collate_pixels

COMPILE_WIDTH_MULTIPLE = 64  # padded widths a compiled model sees: max_length / 64 of them at most
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class PaddingCollator:
    """Pads each batch to its own longest row (to a multiple of 8 on GPU, for tensor cores).
    With `pixels` (the tokenized info's `images`), it also turns cached pixels into
    pixel_values and has_image for the rows that have an image."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, pixels: dict | None = None,
                 max_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.pixels = pixels
        # Rounding up must not pass the model's position table: CLIP has 77 positions, not 80.
        self.max_length = max_length

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        longest = max(lengths)
        width = -(-longest // self.multiple) * self.multiple
        if self.max_length is not None:
            width = max(longest, min(width, self.max_length))
        batch = {}
        for key in TOKEN_KEYS:
            if key not in features[0]:
                continue
            # One preallocated array per key, each row copied in by a slice: no per-row lists.
            out = np.full((len(features), width), self.pad_token_id if key == "input_ids" else 0, np.int64)
            for i, (f, n) in enumerate(zip(features, lengths)):
                out[i, :n] = f[key]
            batch[key] = torch.from_numpy(out)
        if "labels" in features[0]:  # absent when predicting
            for key in ("labels", "label_mask"):
                batch[key] = torch.from_numpy(np.asarray([f[key] for f in features], np.float32))
        if self.pixels is not None and PIXEL_COLUMN in features[0]:
            batch.update(collate_pixels([f[PIXEL_COLUMN] for f in features], self.pixels))
        return batch
