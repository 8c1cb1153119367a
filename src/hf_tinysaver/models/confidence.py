"""Confidence scores of a saver's logits, shared by the cascade's forward pass and by calibration.

Both use this one function on the same float32 logits, so a threshold calibrated from recorded logits makes exactly
the same exit decisions as the deployed model. Scores are computed in float64 and in log space: very confident
images keep their order instead of all saturating to 1.0 (in float32, over 10 % of a CIFAR-10 saver's maximum
probabilities are exactly 1.0).

Copied next to saved cascades as remote code: imports only torch.
"""

from __future__ import annotations

import math

import torch

CONFIDENCE_METRICS = ("max_prob", "margin", "entropy")


def compute_confidence(logits: torch.Tensor, metric: str = "max_prob", temperature: float = 1.0) -> torch.Tensor:
    """Scores how confident a classifier is on each row of `logits`; higher means more confident.

    Args:
        logits: `(batch, num_labels)` logits of the saver.
        metric: `"max_prob"` (maximum softmax probability, the paper's), `"margin"` (top-1 minus top-2
            probability) or `"entropy"` (1 minus the softmax entropy divided by `log(num_labels)`).
        temperature: The logits are divided by it first; it changes scores, never predictions.

    Returns:
        A float64 tensor of shape `(batch,)` with values in [0, 1].
    """
    if logits.ndim != 2:
        raise ValueError(f"Expected logits of shape (batch, num_labels), got {tuple(logits.shape)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if logits.requires_grad:
        logits = logits.detach()
    if temperature != 1.0:
        logits = logits.to(torch.float64) / temperature
    if metric == "max_prob":
        # Two ops: the cascade runs this on every batch, where each small op costs microseconds of dispatch.
        return torch.softmax(logits, dim=-1, dtype=torch.float64).amax(dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float64)
    if metric == "margin":
        if logits.shape[-1] < 2:
            raise ValueError("The margin confidence needs at least 2 labels.")
        top2 = log_probs.topk(2, dim=-1).values.exp()
        return top2[:, 0] - top2[:, 1]
    if metric == "entropy":
        probs = log_probs.exp()
        entropy = -(probs * log_probs).nan_to_num(0.0).sum(dim=-1)
        return (1.0 - entropy / math.log(max(logits.shape[-1], 2))).clamp(0.0, 1.0)
    raise ValueError(f"Unknown confidence metric {metric!r}; choose one of {CONFIDENCE_METRICS}.")


def first_exit(confidences: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Index of the first exit whose confidence is strictly greater than its threshold, else `len(thresholds)`.

    The exit rule of a multi-exit cascade, used by the deployed ESN forward and by its calibration on records alike.

    Args:
        confidences: `(batch, E)` confidences of the exits in order (the saver first).
        thresholds: `E` thresholds.

    Returns:
        `(batch,)` long tensor with values in `0..E` (`E` = the base's final answer).
    """
    passes = confidences > torch.as_tensor(thresholds, dtype=confidences.dtype, device=confidences.device)
    passes = torch.cat([passes, passes.new_ones(passes.shape[0], 1)], dim=1)
    return passes.long().argmax(dim=1)


__all__ = ["CONFIDENCE_METRICS", "compute_confidence", "first_exit"]
