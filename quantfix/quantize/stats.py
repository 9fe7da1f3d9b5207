"""What the quantization math reads of the calibration data for one input of a linear module
(collected by ``quantfix.calib``): the Hessian, or its diagonal, and per-channel magnitudes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class InputStats:
    hessian: torch.Tensor  # [in, in], float32, sum over tokens of x x^T; [in]: its diagonal only
    absmax: torch.Tensor  # [in]
    absmean: torch.Tensor  # [in]
    n_tokens: int
    # [in]: the absmax over the first ``CalibStats.head_samples`` samples only (the diagnosis's float side)
    head_absmax: Optional[torch.Tensor] = None

    def diagonal(self) -> torch.Tensor:
        return self.hessian if self.hessian.dim() == 1 else torch.diagonal(self.hessian)

    def full(self) -> torch.Tensor:
        """The full Hessian; collected only when an algorithm of the run needs it (``collect``'s
        ``full_hessian``)."""
        if self.hessian.dim() != 2:
            raise RuntimeError("only the Hessian's diagonal was collected (no algorithm of the run needed more): "
                               "calib.collect(full_hessian=True)")
        return self.hessian
