"""Pure window geometry of the samplers: no I/O, numpy in and out.

Read windows (chunk-aligned, overlapping by half for random patches), cover
counts (how many windows hold a patch), eligibility of patch origins and of
labelled pixels, box sums, reflect-padded cuts at scene edges, and the tile
origins of a validation grid. Every function here is deterministic and
side-effect free; the samplers combine them with reads.
"""

from __future__ import annotations

import numpy as np

from tilefuse.errors import InputError
from tilefuse.scene import IGNORE


def check_patch_fits(shape: tuple[int, int], patch: int, path: object) -> None:
    """Refuse a patch larger than a store (one line naming the fix)."""
    if min(shape) < patch:
        raise InputError(f"patch size {patch} exceeds store {path} ({shape[0]} x {shape[1]}): pass a smaller patch_size= (--patch-size)")


def aligned_window(window: int, chunk: int) -> int:
    """``window`` rounded up to a whole number of chunks (at least one)."""
    return max(1, -(-window // chunk)) * chunk


def window_blocks(n: int, window: int) -> list[tuple[int, int]]:
    """Split positions ``0..n-1`` into consecutive blocks starting at multiples of ``window``."""
    return [(start, min(start + window, n)) for start in range(0, n, window)]


def box_sums(mask: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``mask`` over every ``size x size`` box fully inside it; shape ``(H - size + 1, W - size + 1)``."""
    dtype = np.int32 if mask.size < 2**31 else np.int64
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
    np.cumsum(np.cumsum(mask, axis=0, dtype=dtype), axis=1, out=table[1:, 1:])
    return table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]


def eligible_origins(
    valid: np.ndarray,
    label: np.ndarray,
    in_region: np.ndarray | None,
    patch: int,
    margin: int = 0,
    min_labelled: float = 0.0,
) -> np.ndarray:
    """Which patch origins of an extent qualify: a bool array ``(H - patch + 1, W - patch + 1)``.

    An origin qualifies when the patch centre is valid, at least
    ``min_labelled`` of the target area (the patch less ``margin`` on each
    side) is valid and labelled, and the whole patch lies in ``in_region``.
    """
    ny, nx = valid.shape[0] - patch + 1, valid.shape[1] - patch + 1
    if ny <= 0 or nx <= 0:
        return np.zeros((max(ny, 0), max(nx, 0)), dtype=bool)
    c = patch // 2
    ok = valid[c : c + ny, c : c + nx].copy()
    if min_labelled > 0:
        target = patch - 2 * margin
        labelled = box_sums((label != IGNORE) & valid, target)[margin : margin + ny, margin : margin + nx]
        ok &= labelled >= min_labelled * target * target
    if in_region is not None and not in_region.all():
        ok &= box_sums(in_region, patch) == patch * patch
    return ok


def centre_classes(valid: np.ndarray, label: np.ndarray, patch: int) -> np.ndarray:
    """Label of each origin's centre pixel (IGNORE where unlabelled or not valid)."""
    ny, nx = valid.shape[0] - patch + 1, valid.shape[1] - patch + 1
    c = patch // 2
    return np.where(valid[c : c + ny, c : c + nx], label[c : c + ny, c : c + nx], IGNORE).astype(np.uint8)


def labelled_pixels(
    valid: np.ndarray, label: np.ndarray, in_region: np.ndarray | None, margin: int, pad: tuple[int, int, int, int]
) -> np.ndarray:
    """Which pixels of a window qualify as labelled-pixel samples (bool, the window's shape).

    ``valid``, ``label`` and ``in_region`` cover the window plus ``margin`` on
    each side, less ``pad`` (top, bottom, left, right) where that ran past the
    scene edge. A pixel qualifies when it is valid and labelled and its
    ``(2 margin + 1)^2`` neighbourhood, clipped to the scene (the rest is
    reflect-padded later), lies in ``in_region``.
    """
    top, bottom, left, right = pad
    h, w = valid.shape
    core = (slice(top, top + h), slice(left, left + w))
    labelled = np.zeros((h + top + bottom, w + left + right), dtype=bool)
    labelled[core] = valid & (label != IGNORE)
    ok = labelled[margin : labelled.shape[0] - margin, margin : labelled.shape[1] - margin]
    if in_region is not None and not in_region.all():
        outside_region = np.zeros_like(labelled)
        outside_region[core] = ~in_region
        ok = ok & (box_sums(outside_region, 2 * margin + 1) == 0)
    return ok


def cut_reflect(array: np.ndarray, extent: tuple[int, int, int, int], y: int, x: int, size: int) -> np.ndarray:
    """The ``size x size`` block at (``y``, ``x``) of a scene, from ``array`` covering ``extent``.

    ``extent`` (y0, y1, x0, x1) is the part of the scene ``array`` holds; where
    the block runs past it (only at scene edges) it is reflect-padded.
    """
    y0, y1, x0, x1 = extent
    top, left = max(0, y0 - y), max(0, x0 - x)
    bottom, right = max(0, y + size - y1), max(0, x + size - x1)
    block = array[..., y + top - y0 : y + size - bottom - y0, x + left - x0 : x + size - right - x0]
    if top or bottom or left or right:
        widths = [(0, 0)] * (block.ndim - 2) + [(top, bottom), (left, right)]
        block = np.pad(block, widths, mode="reflect")
    return block


def grid_origins(n: int, tile: int, margin: int) -> list[tuple[int, int]]:
    """Tile origins along one axis whose targets (tile less ``margin``) cover ``margin..n-margin`` once.

    Returns ``(origin, owned_from)``: the last tile is shifted back to end at
    the scene edge, and its target pixels before ``owned_from`` belong to the
    previous tile.
    """
    if tile > n:
        return []
    step = tile - 2 * margin
    origins = list(range(0, n - tile + 1, step))
    if origins[-1] != n - tile:
        origins.append(n - tile)
    out, covered = [], margin
    for origin in origins:
        out.append((origin, max(origin + margin, covered)))
        covered = origin + tile - margin
    return out



def masked_label(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """``label`` of decoded ``arrays`` with IGNORE wherever ``valid`` is False."""
    return np.where(arrays["valid"], arrays["label"], IGNORE).astype(np.uint8)


def window_starts(n: int, patch: int, stride: int) -> list[int]:
    """Starts of the read windows along one axis: every multiple of ``stride`` that leaves room for a patch."""
    return list(range(0, n - patch + 1, stride))


def cover_counts(n: int, patch: int, window: int, stride: int) -> np.ndarray:
    """For every patch origin ``0..n-patch`` along one axis, how many read windows hold the whole patch.

    Windows start at multiples of ``stride`` and are ``window`` long (clipped
    to the scene); ``window >= stride + patch - 1`` makes every count >= 1.
    """
    origin = np.arange(n - patch + 1)
    return origin // stride - (np.maximum(0, origin + patch - window) + stride - 1) // stride + 1


def window_geometry(window: int, patch: int, chunk: int) -> tuple[int, int]:
    """(read window edge, stride): the stride is a whole number of chunks >= ``window / 2`` and >= ``patch - 1``,
    the window twice the stride, so windows overlap by half and decode whole chunks only."""
    stride = aligned_window(max(window // 2, patch - 1), chunk)
    return 2 * stride, stride


