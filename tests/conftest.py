"""Shared fixtures: tiny random models built from configs, a locally trained tokenizer, and
small data. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_CONFIG = Path(__file__).parents[1] / "cockatoo_lib" / "presets" / "sample.yaml"


def build_tokenizer(texts: list[str], vocab_size: int = 600):
    """A WordPiece tokenizer trained here on `texts`, wrapped as a BERT-style fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                             special_tokens=specials))
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


def build_tiny_model(kind: str, tokenizer, folder: Path) -> Path:
    """Save a tiny random base model of `kind` with `tokenizer` into `folder`."""
    import torch
    from transformers import (
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
    if kind == "deberta":
        model = DebertaV2Model(DebertaV2Config(vocab_size=vocab, max_position_embeddings=512,
                                               **TINY, **ids))
    elif kind == "modernbert":
        model = ModernBertModel(ModernBertConfig(
            vocab_size=vocab, max_position_embeddings=1024, global_attn_every_n_layers=2,
            local_attention=16, sep_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id, **TINY, **ids))
    elif kind == "clip":
        model = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=vocab, max_position_embeddings=77, **TINY, **ids),
            vision_config=dict(image_size=224, patch_size=32, **TINY),
            projection_dim=24))
        from transformers.models.clip import CLIPImageProcessorPil

        CLIPImageProcessorPil().save_pretrained(folder)  # CLIP's defaults: 224 x 224
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer(_sample_texts())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """model_type -> folder of a tiny random base model with a local tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "deberta": build_tiny_model("deberta", tiny_tokenizer, root / "deberta"),
        "modernbert": build_tiny_model("modernbert", tiny_tokenizer, root / "modernbert"),
        "clip-vit": build_tiny_model("clip", tiny_tokenizer, root / "clip"),
    }


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """The demo sample, prepared (all rows, seed 42)."""
    from cockatoo_lib.data import load_data_config, prepare

    out = tmp_path_factory.mktemp("sample") / "data"
    prepare(load_data_config(str(SAMPLE_CONFIG)), out)
    return out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """400 rows of the sample: enough for every label, quick to train on."""
    from cockatoo_lib.data import load_data_config, prepare

    out = tmp_path_factory.mktemp("small") / "data"
    prepare(load_data_config(str(SAMPLE_CONFIG)), out, max_samples=400)
    return out
