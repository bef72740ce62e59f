"""Spatially disjoint train / val / test splits of scene stores, and the split file of a run.

:func:`spatial_split` assigns blocks of each store's grid (or whole stores) to
train / val / test. A sample is used by a split only when its whole input
extent lies in that split's blocks, so no pixel seen while training lies in the
neighbourhood of a validation or test sample: the buffer between splits is
implicit and exact. :func:`split_mask` gives the pixels a split can be scored
on without leakage (``tilefuse evaluate --split``).

The split file (:data:`SPLIT_FILE` in a run folder: the stores, the context
of a sample around its pixel, and the block assignment) has one owner:
:func:`save_split` writes it (atomically), :func:`load_split` reads it;
:func:`split_sha256` is the SHA-256 of the file written for a split, which a
run records to recognise an edited file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.sampling.geometry import box_sums

SUBSETS = ("train", "val", "test")
"""Split names; their index is the code stored in :class:`SpatialSplit` assignments."""
SPLIT_FILE = "split.json"
"""Name of the split file in a run folder."""


@dataclass(frozen=True)
class SpatialSplit:
    """Blocks of each store's grid assigned to train / val / test (codes 0 / 1 / 2)."""

    block: int
    """Block edge in pixels (whole-store splits use a block as large as the largest store)."""
    assignment: tuple[np.ndarray, ...]
    """Per store, ``(ceil(H / block), ceil(W / block))`` int8 codes, index into :data:`SUBSETS`."""

    def region(self, store: int, subset: str, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Boolean mask of the pixels of rows ``y0:y1``, columns ``x0:x1`` that belong to ``subset``."""
        code = SUBSETS.index(subset)
        blocks = self.assignment[store]
        rows = np.arange(y0, y1) // self.block
        cols = np.arange(x0, x1) // self.block
        return blocks[rows[:, None], cols[None, :]] == code

    def fraction(self, subset: str) -> float:
        code = SUBSETS.index(subset)
        return float(np.mean(np.concatenate([(a == code).ravel() for a in self.assignment])))

    def to_dict(self) -> dict:
        return {"block": self.block, "assignment": [a.tolist() for a in self.assignment]}

    @classmethod
    def from_dict(cls, data: dict) -> "SpatialSplit":
        return cls(int(data["block"]), tuple(np.asarray(a, dtype=np.int8) for a in data["assignment"]))


def split_mask(
    split: SpatialSplit, store: int, subset: str, y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int], context: int = 0
) -> np.ndarray:
    """Pixels of rows ``y0:y1``, columns ``x0:x1`` whose ``(2 context + 1)^2`` neighbourhood, clipped to the
    scene of ``shape``, lies wholly in ``subset``: where a split's pixels can be scored without leakage."""
    h, w = shape
    ry0, ry1, rx0, rx1 = max(0, y0 - context), min(h, y1 + context), max(0, x0 - context), min(w, x1 + context)
    outside = np.zeros((y1 - y0 + 2 * context, x1 - x0 + 2 * context), dtype=bool)
    outside[ry0 - (y0 - context) : ry1 - (y0 - context), rx0 - (x0 - context) : rx1 - (x0 - context)] = ~split.region(
        store, subset, ry0, ry1, rx0, rx1
    )
    return box_sums(outside, 2 * context + 1) == 0


def spatial_split(
    shapes: Sequence[tuple[int, int]],
    *,
    by: str = "blocks",
    val: float = 0.1,
    test: float = 0.0,
    block: int = 512,
    weights: Sequence[np.ndarray] | None = None,
    seed: int = 0,
) -> SpatialSplit:
    """Assign blocks (``by="blocks"``) or whole stores (``by="stores"``) to train / val / test.

    Blocks are taken in a random order fixed by ``seed`` and given to val, then
    test, until each holds its fraction of the total weight (``weights``: per
    store, one number per block, e.g. labelled pixels; default: block area);
    the rest is train. Deterministic for a seed.
    """
    if by not in ("blocks", "stores"):
        raise InputError(f"unknown split {by!r}: use 'blocks' or 'stores'")
    if val < 0 or test < 0 or val + test >= 1:
        raise InputError(f"split fractions val={val}, test={test} must be >= 0 and sum to less than 1")
    if by == "stores":
        block = max(max(int(h), int(w)) for h, w in shapes)
        if len(shapes) < 1 + (val > 0) + (test > 0):
            raise InputError(
                f"split='stores' (--split stores) needs a store for each of train{', val' if val else ''}{', test' if test else ''}; "
                f"got {len(shapes)}: pass more stores or split='blocks'"
            )
    grids = [(-(-int(h) // block), -(-int(w) // block)) for h, w in shapes]
    if weights is None:
        weights = [_block_areas(h, w, block) for h, w in shapes]
    flat = np.concatenate([np.asarray(wt, dtype=np.float64).ravel() for wt in weights])
    codes = np.zeros(flat.size, dtype=np.int8)
    order = np.random.default_rng(seed).permutation(flat.size)
    total = flat.sum()
    position = 0
    for code, fraction in ((1, val), (2, test)):
        if fraction <= 0:
            continue
        taken = 0.0
        while position < order.size and (taken == 0.0 or taken < fraction * total):
            if flat[order[position]] > 0 or by == "stores":
                codes[order[position]] = code
                taken += flat[order[position]]
            position += 1
    if not np.any((codes == 0) & (flat > 0)):
        raise InputError("the split leaves nothing to train on: lower val_fraction= / test_fraction= (--val-fraction / --test-fraction) or use smaller blocks")
    out, start = [], 0
    for ny, nx in grids:
        out.append(codes[start : start + ny * nx].reshape(ny, nx))
        start += ny * nx
    return SpatialSplit(block, tuple(out))


def _block_areas(h: int, w: int, block: int) -> np.ndarray:
    rows = np.minimum(block, h - np.arange(0, h, block))
    cols = np.minimum(block, w - np.arange(0, w, block))
    return np.outer(rows, cols).astype(np.float64)



def labelled_per_block(reader, block: int, *, window: int = 2048, threads: int = 4) -> np.ndarray:
    """Valid labelled pixels of each ``block x block`` block of a store (a split's weights), shape
    ``(ceil(H / block), ceil(W / block))``; ``reader`` is a :class:`~tilefuse.sampling.reader.SceneReader`
    (or alike). Reads ``valid`` and ``label`` in chunk-aligned windows of about ``window`` px, so
    memory stays bounded whatever the store's or the block's size."""
    from concurrent.futures import ThreadPoolExecutor

    from tilefuse.sampling.geometry import aligned_window, window_blocks
    from tilefuse.scene import IGNORE

    h, w = reader.shape
    step = aligned_window(window, min(reader.chunk))
    out = np.zeros((-(-h // block), -(-w // block)), dtype=np.int64)

    def count(extent):
        (y0, y1), (x0, x1) = extent
        arrays = reader.read(y0, y1, x0, x1, ["valid", "label"])
        labelled = (arrays["valid"] & (arrays["label"] != IGNORE)).astype(np.int64)
        rows, cols = np.arange(y0, y1) // block, np.arange(x0, x1) // block
        starts_y, starts_x = np.flatnonzero(np.diff(rows, prepend=-1)), np.flatnonzero(np.diff(cols, prepend=-1))
        sums = np.add.reduceat(np.add.reduceat(labelled, starts_y, axis=0), starts_x, axis=1)
        return rows[starts_y], cols[starts_x], sums

    extents = [(ys, xs) for ys in window_blocks(h, step) for xs in window_blocks(w, step)]
    with ThreadPoolExecutor(max(1, min(threads, len(extents)))) as pool:
        for rows, cols, sums in pool.map(count, extents):
            out[rows[:, None], cols[None, :]] += sums
    return out.astype(np.float64)


def touches(split: SpatialSplit | None, subset: str, store: int, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Whether rows ``y0:y1``, columns ``x0:x1`` of a store hold any block of ``subset`` (no I/O)."""
    if split is None:
        return True
    code = SUBSETS.index(subset)
    blocks = split.assignment[store][y0 // split.block : -(-y1 // split.block), x0 // split.block : -(-x1 // split.block)]
    return bool((blocks == code).any())


@dataclass(frozen=True)
class SavedSplit:
    """What a split file holds."""

    split: SpatialSplit
    stores: list[str]
    """Resolved store paths, in the order of ``split.assignment``."""
    context: int
    """Pixels of input a sample needs around a scored pixel (the margin, or half the patch)."""


def save_split(folder: str | os.PathLike, split: SpatialSplit, stores: Sequence[str | os.PathLike], context: int) -> Path:
    """Write the split file into run ``folder`` (replaced atomically); returns its path."""
    from tilefuse.outputs import write_file

    path = Path(folder) / SPLIT_FILE
    write_file(path, _split_text(split, stores, context))
    return path


def split_sha256(split: SpatialSplit | None, stores: Sequence[str | os.PathLike], context: int) -> str | None:
    """SHA-256 of the split file :func:`save_split` writes for ``split`` (None for no split).

    A run records it, so that the split file found in the run folder later (a
    resume, ``tilefuse evaluate --split RUN``) can be checked by the SHA-256 of
    its bytes: an edited file that is still a split is otherwise read as the
    run's own.
    """
    if split is None:
        return None
    return hashlib.sha256(_split_text(split, stores, context).encode()).hexdigest()


def _split_text(split: SpatialSplit, stores: Sequence[str | os.PathLike], context: int) -> str:
    """The split file's text (ASCII: JSON escapes the rest), the same for the same split."""
    return json.dumps({"stores": [str(s) for s in stores], "context": int(context), **split.to_dict()})


def load_split(path: str | os.PathLike) -> SavedSplit:
    """Read a split file, or the one in run folder ``path``; InputError naming the file when it is not one."""
    path = Path(path)
    path = path / SPLIT_FILE if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
        saved = SavedSplit(SpatialSplit.from_dict(data), [str(s) for s in data["stores"]], int(data.get("context", 0)))
        problem = _split_problem(data, saved)
        if problem:
            raise ValueError(problem)
        return saved
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as error:
        raise InputError(f"{path} is not a training split ({error}): pass a run folder trained with a split") from None


def _split_problem(data: dict, saved: SavedSplit) -> str | None:
    """What is wrong with a split file's values (edited or damaged), or None."""
    if not isinstance(data["block"], int) or isinstance(data["block"], bool) or data["block"] < 1:
        return f"block {data['block']!r} is not a whole number of px >= 1"
    if not isinstance(data["stores"], list) or len(saved.stores) != len(saved.split.assignment):
        return "its stores and assignments differ in number"
    if saved.context < 0 or data.get("context", 0) != saved.context:
        return f"context {data.get('context')!r} is not a whole number of px >= 0"
    for a in saved.split.assignment:
        if a.ndim != 2 or not np.isin(a, range(len(SUBSETS))).all():
            return f"an assignment is not a grid of codes 0..{len(SUBSETS) - 1}"
    return None
