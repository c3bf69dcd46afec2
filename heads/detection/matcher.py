"""Assign each prediction (anchor or proposal) to a ground-truth box by IoU (Faster R-CNN, section 3.1.2)."""
from __future__ import annotations

import torch

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """Match predictions to ground truth from an IoU matrix.

    A prediction whose best IoU is ``>= high`` gets that ground truth's index; ``< low`` gets
    :data:`BELOW_LOW_THRESHOLD` (-1, background); in between gets :data:`BETWEEN_THRESHOLDS`
    (-2, ignored). With ``allow_low_quality_matches`` every ground truth also claims the
    prediction(s) that overlap it most, even below ``high`` (Faster R-CNN's condition (i), so no
    object is left without an anchor); ties all count.

    Args:
        high_threshold: foreground IoU (0.7 for the RPN, 0.5 for the box head).
        low_threshold: background IoU (0.3 for the RPN, 0.5 for the box head).
        allow_low_quality_matches: see above (RPN: True, box head: False).
    """

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: torch.Tensor) -> torch.Tensor:
        """Args:
            iou: ``(G, P)`` IoU of ``G`` ground-truth boxes with ``P`` predictions.

        Returns:
            ``(P,)`` long: ground-truth index, -1 (background) or -2 (ignore). With no ground
            truth every prediction is background.
        """
        if iou.numel() == 0 or iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BELOW_LOW_THRESHOLD, dtype=torch.long, device=iou.device)
        # torch.where, not boolean-mask assignment: no host sync (a mask assignment runs nonzero)
        best, matches = iou.max(dim=0)
        low = torch.where(best < self.low_threshold, BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS)
        out = torch.where(best < self.high_threshold, low, matches)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1).values
            # every prediction that reaches some ground truth's best IoU keeps its own best match
            is_best = (iou == best_per_gt[:, None]).any(dim=0)
            out = torch.where(is_best, matches, out)
        return out

    def __repr__(self) -> str:
        return (f"Matcher(high={self.high_threshold}, low={self.low_threshold}, "
                f"allow_low_quality_matches={self.allow_low_quality_matches})")
