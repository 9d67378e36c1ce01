"""scikit-learn's handwritten digits (8x8, values 0..16, shipped inside the scikit-learn wheel).

Shape legend: N images, C = 1 channel, H = W = 8.

Pixels are mapped 0..16 -> [-1, 1]. The split is stratified by class with a fixed seed; the
held-out part (10% by default) is used only by the quality gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DigitsSplit:
    x_train_NCHW: torch.Tensor  # float32 in [-1, 1]
    y_train_N: torch.Tensor  # int64 in 0..9
    x_test_NCHW: torch.Tensor
    y_test_N: torch.Tensor


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """0..16 -> [-1, 1] as float32 [N, 1, 8, 8]."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, 8, 8)
    return x / 8.0 - 1.0


def load_digits_split(seed: int = 0, holdout_fraction: float = 0.1) -> DigitsSplit:
    """The digits, split train/held-out (stratified, `random_state=seed`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data,
        digits.target,
        test_size=holdout_fraction,
        random_state=seed,
        stratify=digits.target,
    )
    return DigitsSplit(
        to_unit_range(x_tr),
        torch.as_tensor(y_tr, dtype=torch.long),
        to_unit_range(x_te),
        torch.as_tensor(y_te, dtype=torch.long),
    )
