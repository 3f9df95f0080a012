"""Multi-label losses, computed per element and masked by `label_mask`.

A row's loss is the mean over the labels its source annotates; rows with no annotated label
add nothing. The batch loss is the mean over rows that have at least one annotated label; with
`rows` (the annotated rows of a whole optimizer step, over every accumulated micro-batch) it is
this micro-batch's share of that step's mean, so how a step is split does not change its
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cockatoo_lib.plan.catalogue import Plan

# ASL's defaults are the plan's, declared once there.
GAMMA_NEG, GAMMA_POS, CLIP = (Plan.model_fields[f"asl_{name}"].default
                              for name in ("gamma_neg", "gamma_pos", "clip"))


def training_mask(mask: torch.Tensor, unannotated_weight: float) -> torch.Tensor:
    """The mask the loss weighs each label by: 1 where annotated, `unannotated_weight` elsewhere
    (the targets there are 0: weak negatives); the label mask itself when that weight is 0."""
    if not unannotated_weight:
        return mask
    return mask + (1 - mask) * unannotated_weight


def _reduce(per_element: torch.Tensor, mask: torch.Tensor,
            weights: torch.Tensor | None = None, rows: torch.Tensor | int | None = None) -> torch.Tensor:
    """`weights`, one per label, scale each label's term (rebalancing by reweighting)."""
    mask = mask.to(per_element.dtype)
    if weights is not None:
        per_element = per_element * weights.to(per_element.device, per_element.dtype)
    per_row_count = mask.sum(dim=1)
    per_row = (per_element * mask).sum(dim=1) / per_row_count.clamp(min=1)
    annotated = (per_row_count > 0).to(per_element.dtype)
    denominator = annotated.sum() if rows is None else torch.as_tensor(rows, dtype=per_element.dtype)
    return (per_row * annotated).sum() / denominator.clamp(min=1)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    gamma_neg: float = GAMMA_NEG, gamma_pos: float = GAMMA_POS, clip: float = CLIP,
                    eps: float = 1e-8, weights: torch.Tensor | None = None,
                    rows: torch.Tensor | int | None = None) -> torch.Tensor:
    """ASL (Ridnik et al., 2021): focusing on hard examples, with easy negatives shifted away
    by `clip`, so the many negatives of a multi-label task do not drown the positives."""
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0)  # clip 0 leaves p as it is
    # log(p) through logsigmoid: a clamp would cut the gradient of a positive whose logit is
    # below about -18, exactly the badly wrong positives that most need it.
    loss_pos = targets * F.logsigmoid(logits) * (1 - p) ** gamma_pos
    loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps)) * p_neg ** gamma_neg
    return _reduce(-(loss_pos + loss_neg), mask, weights, rows)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               pos_weight: torch.Tensor | None = None, weights: torch.Tensor | None = None,
               rows: torch.Tensor | int | None = None) -> torch.Tensor:
    per_element = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight, reduction="none")
    return _reduce(per_element, mask, weights, rows)
