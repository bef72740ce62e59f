"""Blending windows for overlapping tiles: pure functions, no I/O.

A tile's class probabilities are multiplied by a window before they are summed
with their neighbours', and the sum is divided by the summed windows (the
engine divides by the summed weighted probabilities, which is the same thing
since probabilities sum to 1). Division by the summed windows makes the
normalisation exact everywhere, at scene edges too, so long as every window is
strictly positive: windows are sampled at pixel centres and floored at
:data:`FLOOR` (MONAI floors its gaussian map the same way), so no covered pixel
ever has a zero weight sum.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tilefuse.errors import InputError

WINDOWS = ("gaussian", "hann", "cosine", "constant")
"""Window kinds: gaussian (sigma = 0.125 of the tile, as MONAI), hann, cosine ramp over the overlap, constant."""
GAUSSIAN_SIGMA = 0.125
FLOOR = 1e-3
"""Smallest weight relative to the window's peak of 1."""


def window_1d(kind: str, tile: int, overlap: int = 0) -> np.ndarray:
    """The 1-D window of ``kind`` over ``tile`` pixels (float64, peak 1, sampled at pixel centres)."""
    centre = np.arange(tile) + 0.5
    if kind == "gaussian":
        window = np.exp(-0.5 * ((centre - tile / 2) / (GAUSSIAN_SIGMA * tile)) ** 2)
        return window / window.max()
    if kind == "hann":
        window = np.sin(np.pi * centre / tile) ** 2
        return window / window.max()
    if kind == "cosine":
        window = np.ones(tile)
        if overlap > 0:
            ramp = 0.5 - 0.5 * np.cos(np.pi * centre[:overlap] / overlap)
            window[:overlap] = ramp
            window[tile - overlap :] = np.minimum(window[tile - overlap :], ramp[::-1])
        return window / window.max()
    if kind == "constant":
        return np.ones(tile)
    raise InputError(f"unknown blend window {kind!r}: choose one of {', '.join(WINDOWS)}")


@lru_cache(maxsize=32)
def tile_weights(kind: str, tile: int, overlap: int = 0) -> np.ndarray:
    """The 2-D window of one ``tile x tile`` tile: outer product of 1-D windows, floored at :data:`FLOOR`.

    Computed once per (kind, tile, overlap) and returned read-only (float32).
    """
    line = window_1d(kind, tile, overlap)
    weights = np.maximum(np.outer(line, line), FLOOR).astype(np.float32)
    weights.flags.writeable = False
    return weights
