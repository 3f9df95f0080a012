"""Loading base models for training and trained models for evaluation and serving.

Text models use AutoModelForSequenceClassification. CLIP uses CLIPClassifier: the CLIP
embedding (image and text averaged where an image is present), then a two-layer head.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import Plan

log = logging.getLogger(__name__)


class CLIPClassifier(PreTrainedModel):
    """CLIP embedding -> Linear(projection_dim, head_dim) -> ReLU -> Dropout(0.1)
    -> Linear(head_dim, labels)."""

    config_class = CLIPConfig
    base_model_prefix = "clip"
    supports_gradient_checkpointing = True

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        head_dim = getattr(config, "cockatoo_head_dim", config.projection_dim)
        self.clip = CLIPModel(config)
        self.head = nn.Sequential(
            nn.Linear(config.projection_dim, head_dim),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(head_dim, config.num_labels),
        )
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and any(module is m for m in self.head.modules()):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        else:
            self.clip._init_weights(module)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, has_image=None,
                **_):
        """Text embedding per row, averaged with the image embedding in the rows that have an
        image (`has_image`; all rows when it is not given). Only those rows go through the
        vision tower."""
        embedding = self.clip.get_text_features(input_ids=input_ids,
                                                attention_mask=attention_mask).pooler_output
        if pixel_values is not None:
            if has_image is None:
                has_image = torch.ones(len(pixel_values), dtype=torch.bool, device=pixel_values.device)
            if has_image.any():
                image = self.clip.get_image_features(pixel_values=pixel_values[has_image]).pooler_output
                per_row = embedding.new_zeros(embedding.shape)
                per_row[has_image] = image.to(embedding.dtype)
                embedding = torch.where(has_image.unsqueeze(-1), (embedding + per_row) / 2, embedding)
        return SequenceClassifierOutput(logits=self.head(embedding))


def _label_maps(labels: list[str]) -> dict:
    return {"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}}


def load_base_model(plan: Plan, labels: list[str]) -> PreTrainedModel:
    """The pretrained base model with a fresh multi-label head for `labels`."""
    try:
        if plan.architecture == "clip":
            config = CLIPConfig.from_pretrained(plan.base_model, num_labels=len(labels),
                                                **_label_maps(labels))
            config.cockatoo_head_dim = plan.clip_projection_dim
            # base_model_prefix "clip" lets a plain CLIPModel checkpoint fill `self.clip`;
            # the head starts fresh.
            return CLIPClassifier.from_pretrained(
                plan.base_model, config=config, attn_implementation=plan.attention_implementation)
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(
            plan.base_model, num_labels=len(labels), problem_type="multi_label_classification",
            attn_implementation=plan.attention_implementation, **_label_maps(labels))
    except (OSError, ValueError) as exc:
        raise CockatooError(
            f"cannot load base model {plan.base_model} for {plan.model_type}: "
            f"{str(exc).strip().splitlines()[0]} (offline? set base_model to a local folder)"
        ) from None


@torch.no_grad()
def add_tokens(model: PreTrainedModel, tokenizer, tokens: list[str]) -> None:
    """Add `tokens` (tokenize's extension of the tokenizer) to the tokenizer and give each an
    embedding: the mean of the base vocabulary's, a start that says nothing yet."""
    base = len(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    embeddings[ids] = embeddings[:base].mean(dim=0)


def output_layer(model: PreTrainedModel) -> nn.Linear:
    """The final Linear layer that produces one logit per label."""
    layer = model.head[-1] if isinstance(model, CLIPClassifier) else getattr(model, "classifier", None)
    if not isinstance(layer, nn.Linear) or layer.out_features != model.config.num_labels:
        raise CockatooError(f"cannot find the output layer of {type(model).__name__} "
                            "(expected a Linear `classifier` with one output per label)")
    return layer


@torch.no_grad()
def init_head_bias(model: PreTrainedModel, priors) -> None:
    """Start each label's logit at its prior log-odds (Lin et al., 2017, for focal losses)."""
    p = torch.as_tensor(priors, dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    output_layer(model).bias.copy_(torch.log(p / (1 - p)))


def load_trained_model(model_dir: str | Path, architecture: str) -> PreTrainedModel:
    if architecture == "clip":
        return CLIPClassifier.from_pretrained(str(model_dir))
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(model_dir))


@torch.inference_mode()
def predict_logits(model: PreTrainedModel, batches) -> torch.Tensor:
    """Logits for an iterable of collated batches, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "label_mask")}
        out.append(model(**inputs).logits.float().cpu())
    return torch.cat(out)
