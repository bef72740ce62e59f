"""Training samples drawn straight from scene stores: geometry apart from I/O.

Three samplers, each yielding :class:`Sample` (raw store values around one
position) from one or more scene stores:

- :class:`RandomPatchSampler` (segmentation, PAD): patch origins uniform over
  the eligible positions of all stores (so stores weigh by valid area), with
  optional class balancing and a minimum labelled fraction. It is chunk-aware:
  read windows are chunk-aligned and overlap by half; an origin whose patch
  fits in ``c`` windows weighs ``1/c`` in each. A window is drawn with
  probability proportional to its summed weights, decoded once, and several
  origins are drawn inside it proportionally to ``1/c``, so every eligible
  origin keeps probability ``1/N``; the patches of several windows are
  shuffled together (a *round*) so consecutive batches do not come from one
  place.
- :class:`LabelledPixelSampler` (S²Fin, few labels): a fixed number of
  labelled pixels per class with their P x P neighbourhoods (reflect-padded at
  scene edges), drawn once per seed and replayed in a new order every epoch.
- :class:`GridPatchSampler` (validation): every tile of a regular grid over a
  split, once.

Randomness is counter-based: the generator of round ``r`` of stream ``s`` is
seeded with ``(seed, s, r)``, so the sampler's whole RNG state is the number of
samples each stream has handed out (see :meth:`RandomPatchSampler.iter_stream`'s
``start``), which a checkpoint stores as plain JSON and a resumed run replays
exactly.

:func:`spatial_split` assigns blocks of the grid (or whole stores) to
train / val / test. A sample is used by a split only when its whole input
extent lies in that split's blocks, so no pixel seen while training lies in the
neighbourhood of a validation or test sample: the buffer between splits is
implicit and exact.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from tilefuse.errors import InputError
from tilefuse.scene import IGNORE

SUBSETS = ("train", "val", "test")
"""Split names; their index is the code stored in :class:`SpatialSplit` assignments."""
DEFAULT_WINDOW = 1024
"""Edge (px) of the chunk-aligned window one decode reads."""


# --------------------------------------------------------------------------- I/O


class SceneReader:
    """Reads rectangular extents of a scene store straight from zarr, one decode per call.

    Opens the zarr group lazily, so a reader can be pickled into a DataLoader
    worker and opens its own handle there.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._group = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_group": None}

    @property
    def group(self):
        """The store's zarr group, read through :func:`tilefuse.storage.open_group` (damaged chunks raise InputError)."""
        if self._group is None:
            from tilefuse.storage import open_group

            self._group = open_group(self.path)
        return self._group

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.group["valid"].shape)

    @property
    def chunk(self) -> tuple[int, int]:
        """Spatial edge of the store's (inner) chunks, the unit one read decodes."""
        return tuple(int(n) for n in self.group["valid"].chunks)

    def has(self, name: str) -> bool:
        return name in self.group

    def read(self, y0: int, y1: int, x0: int, x1: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Arrays ``names`` over rows ``y0:y1`` and columns ``x0:x1`` (bands first for modalities)."""
        out = {}
        for name in names:
            array = self.group[name]
            out[name] = array[..., y0:y1, x0:x1] if array.ndim == 3 else array[y0:y1, x0:x1]
        return out


# ---------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Sample:
    """Raw store values around one position: what a sampler hands to the dataset."""

    store: int
    y: int
    """Row of the top-left input pixel in the store (may be negative where reflect-padded)."""
    x: int
    data: dict[str, np.ndarray]
    """modality -> (C, P, P) in the store's dtype."""
    label: np.ndarray
    """(P, P) uint8; IGNORE where unlabelled or not valid."""
    dihedral: int = 0
    """Augmentation drawn for this sample: rotate by 90° x (d % 4), then flip columns if d >= 4."""
    window: int = -1
    """Index of the decoded window it was cut from (random patches), for diagnostics."""


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
                f"--split stores needs a store for each of train{', val' if val else ''}{', test' if test else ''}; "
                f"got {len(shapes)}: pass more --store or use --split blocks"
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
        raise InputError("the split leaves nothing to train on: lower --val-fraction / --test-fraction or use smaller blocks")
    out, start = [], 0
    for ny, nx in grids:
        out.append(codes[start : start + ny * nx].reshape(ny, nx))
        start += ny * nx
    return SpatialSplit(block, tuple(out))


def _block_areas(h: int, w: int, block: int) -> np.ndarray:
    rows = np.minimum(block, h - np.arange(0, h, block))
    cols = np.minimum(block, w - np.arange(0, w, block))
    return np.outer(rows, cols).astype(np.float64)


def check_patch_fits(shape: tuple[int, int], patch: int, path: object) -> None:
    """Refuse a patch larger than a store (one line naming the fix)."""
    if min(shape) < patch:
        raise InputError(f"patch size {patch} exceeds store {path} ({shape[0]} x {shape[1]}): pass a smaller --patch-size")


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


# ---------------------------------------------------------------------- samplers


Store = Union[str, os.PathLike, SceneReader]
"""A scene store path, or any object with SceneReader's ``path``, ``shape``, ``chunk``, ``has`` and ``read``."""


def _open_readers(stores: Sequence) -> list[SceneReader]:
    return [s if hasattr(s, "read") else SceneReader(s) for s in stores]


def _touches(split: SpatialSplit | None, subset: str, store: int, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Whether rows ``y0:y1``, columns ``x0:x1`` of a store hold any block of ``subset`` (no I/O)."""
    if split is None:
        return True
    code = SUBSETS.index(subset)
    blocks = split.assignment[store][y0 // split.block : -(-y1 // split.block), x0 // split.block : -(-x1 // split.block)]
    return bool((blocks == code).any())


def _masked_label(arrays: dict[str, np.ndarray]) -> np.ndarray:
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


@dataclass
class _WindowTable:
    """Read windows of all stores with their eligible origins per centre class, each weighted 1 / cover count."""

    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))
    """(n, 5): store, first/last+1 row, first/last+1 column of the window read."""
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 256)))
    """(n, 256): sum over eligible origins of 1 / cover count, per centre class (column IGNORE: unlabelled centre)."""


class RandomPatchSampler:
    """Random ``patch x patch`` samples, uniform over eligible origins of all stores, chunk-aware.

    Read windows are chunk-aligned squares of about ``window`` px that overlap
    by half (stride = half a window), so a window decodes whole chunks only.
    An origin whose patch fits in ``c`` windows weighs ``1 / c`` in each: a
    round draws ``windows_per_round`` windows with probability proportional
    to their summed weights, decodes each once (every modality, label and
    valid), and draws ``patches_per_window`` origins in it with probability
    proportional to ``1 / c`` (by rejection), so every eligible origin of every
    store has the same probability. The round's patches are handed out in a
    random order. With ``class_balance`` an origin also weighs 1 / (count of
    its centre class), so centre classes come out uniform, and only labelled
    centres qualify.
    """

    def __init__(
        self,
        stores: Sequence[Store],
        modalities: Sequence[str],
        patch: int,
        *,
        margin: int = 0,
        split: SpatialSplit | None = None,
        subset: str = "train",
        min_labelled: float = 0.0,
        class_balance: bool = False,
        window: int = DEFAULT_WINDOW,
        patches_per_window: int = 64,
        windows_per_round: int = 8,
        seed: int = 0,
        threads: int = 4,
    ) -> None:
        self.readers = _open_readers(stores)
        self.paths = [r.path for r in self.readers]
        self.modalities = list(modalities)
        self.patch, self.margin = int(patch), int(margin)
        self.split, self.subset = split, subset
        self.min_labelled, self.class_balance = float(min_labelled), bool(class_balance)
        self.patches_per_window, self.windows_per_round = int(patches_per_window), int(windows_per_round)
        self.seed = int(seed)
        if self.patch <= 2 * self.margin:
            raise InputError(f"patch size {patch} leaves no output for a model with margin {margin}: pass a larger --patch-size")
        self.geometry = [window_geometry(window, self.patch, min(r.chunk)) for r in self.readers]
        self.table = self._index(threads)
        self.weights = self._window_weights()

    # -- index: one pass over valid + label, weighing eligible origins per window
    def _window_extents(self) -> list[tuple[int, int, int, int, int]]:
        out = []
        for store, (reader, (window, stride)) in enumerate(zip(self.readers, self.geometry)):
            h, w = reader.shape
            for y0 in window_starts(h, self.patch, stride):
                for x0 in window_starts(w, self.patch, stride):
                    out.append((store, y0, min(y0 + window, h), x0, min(x0 + window, w)))
        return out

    def _inverse_cover(self, store: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """1 / cover count of every origin of a window's extent (shape of its origins)."""
        h, w = self.readers[store].shape
        window, stride = self.geometry[store]
        rows = cover_counts(h, self.patch, window, stride)[y0 : y1 - self.patch + 1]
        cols = cover_counts(w, self.patch, window, stride)[x0 : x1 - self.patch + 1]
        return 1.0 / np.outer(rows, cols)

    def _eligible(self, extent: tuple[int, int, int, int, int], arrays: dict) -> np.ndarray:
        store, y0, y1, x0, x1 = extent
        region = None if self.split is None else self.split.region(store, self.subset, y0, y1, x0, x1)
        ok = eligible_origins(arrays["valid"], arrays["label"], region, self.patch, self.margin, self.min_labelled)
        if self.class_balance:
            ok &= centre_classes(arrays["valid"], arrays["label"], self.patch) != IGNORE
        return ok

    def _weigh(self, extent: tuple[int, int, int, int, int]) -> np.ndarray:
        store, y0, y1, x0, x1 = extent
        if not _touches(self.split, self.subset, *extent):
            return np.zeros(256)
        arrays = self.readers[store].read(y0, y1, x0, x1, ["valid", "label"])
        ok = self._eligible(extent, arrays)
        classes = centre_classes(arrays["valid"], arrays["label"], self.patch)[ok]
        return np.bincount(classes, weights=self._inverse_cover(*extent)[ok], minlength=256)

    def _index(self, threads: int) -> _WindowTable:
        for path, reader in zip(self.paths, self.readers):
            if not reader.has("label"):
                raise InputError(f"{path} has no labels: ingest it with --labels PATH to train on it")
            check_patch_fits(reader.shape, self.patch, path)
        extents = self._window_extents()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            weights = np.array(list(pool.map(self._weigh, extents))).reshape(-1, 256)
        keep = weights.sum(axis=1) > 0
        if not keep.any():
            what = f"{self.subset} area" if self.split is not None else "stores"
            raise InputError(
                f"no valid labelled patch of {self.patch} px with at least {self.min_labelled:.0%} labelled pixels in the {what}: "
                "check the labels, lower --min-labelled or --patch-size"
            )
        return _WindowTable(np.array(extents, dtype=np.int64)[keep], weights[keep])

    def _class_weights(self) -> np.ndarray:
        """Weight of one origin by its centre class (ones, or 1 / count with class balancing)."""
        if not self.class_balance:
            return np.ones(256)
        totals = self.table.weights.sum(axis=0)
        return np.divide(1.0, totals, out=np.zeros(256), where=totals > 0)

    def _window_weights(self) -> np.ndarray:
        weight = self.table.weights @ self._class_weights()
        return weight / weight.sum()

    @property
    def num_origins(self) -> int:
        """Eligible patch origins over all stores (each counted once across the windows holding it)."""
        return int(round(self.table.weights.sum()))

    @property
    def round_size(self) -> int:
        return self.windows_per_round * self.patches_per_window

    # -- sampling
    def decode(self, index: int) -> dict[str, np.ndarray]:
        """Read window ``index`` of the table: every modality, label and valid."""
        store, y0, y1, x0, x1 = (int(v) for v in self.table.windows[index])
        return self.readers[store].read(y0, y1, x0, x1, [*self.modalities, "label", "valid"])

    def _prepare(self, index: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """Decode a window: its arrays (label masked by valid), eligible origins (flat) and their weights."""
        extent = tuple(int(v) for v in self.table.windows[index])
        arrays = self.decode(index)
        ok = self._eligible(extent, arrays)
        weight = self._inverse_cover(*extent)
        if self.class_balance:
            weight = weight * self._class_weights()[centre_classes(arrays["valid"], arrays["label"], self.patch)]
        flat = np.flatnonzero(ok)
        weight = weight.ravel()[flat]
        if not np.isclose(weight.sum(), self.table.weights[index] @ self._class_weights(), rtol=1e-6, atol=0):
            raise InputError(f"{self.paths[extent[0]]} changed while training: restart the run")
        arrays["label"] = _masked_label(arrays)
        return arrays, flat, weight / weight.max()

    def _draw(self, rng: np.random.Generator, flat: np.ndarray, accept: np.ndarray) -> np.ndarray:
        """``patches_per_window`` origins from ``flat`` with probability proportional to ``accept`` (max 1).

        By rejection (cheap: cover counts are 1, 2 or 4, so at least a quarter
        is accepted), or by inverse CDF where class weights can make it rare.
        """
        k, out = self.patches_per_window, []
        if self.class_balance:
            return rng.choice(flat, size=k, p=accept / accept.sum())
        while len(out) < k:
            candidates = rng.integers(0, flat.size, size=2 * k)
            taken = candidates[rng.random(2 * k) < accept[candidates]]
            out.extend(flat[taken].tolist())
        return np.asarray(out[:k])

    def round(self, stream: int, number: int) -> list[Sample]:
        """The patches of round ``number`` of ``stream``, in the order they are handed out."""
        rng = np.random.default_rng([self.seed, stream, number])
        picks = rng.choice(len(self.weights), size=self.windows_per_round, p=self.weights)
        decoded = {index: self._prepare(index) for index in dict.fromkeys(picks.tolist())}
        chosen: list[tuple[int, int, int]] = []
        for index in picks.tolist():
            arrays, flat, accept = decoded[index]
            width = arrays["valid"].shape[1] - self.patch + 1
            chosen.extend((index, *divmod(int(d), width)) for d in self._draw(rng, flat, accept))
        order = rng.permutation(len(chosen))
        dihedral = rng.integers(0, 8, size=len(chosen))
        p, out = self.patch, []
        for position, k in enumerate(order.tolist()):
            index, i, j = chosen[k]
            arrays = decoded[index][0]
            store, y0, _, x0, _ = (int(v) for v in self.table.windows[index])
            data = {m: arrays[m][:, i : i + p, j : j + p] for m in self.modalities}
            out.append(Sample(store, y0 + i, x0 + j, data, arrays["label"][i : i + p, j : j + p], int(dihedral[position]), index))
        return out

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0) -> Iterator[Sample]:
        """Endless samples of ``stream``, skipping the first ``start`` (to resume exactly)."""
        number, offset = divmod(int(start), self.round_size)
        while True:
            yield from self.round(stream, number)[offset:]
            number, offset = number + 1, 0


class LabelledPixelSampler:
    """A fixed set of labelled pixels with their ``patch x patch`` neighbourhoods.

    The set (``count`` pixels of every class present, uniform among the
    class's eligible pixels; or with ``per_class=False``, ``count`` pixels
    uniform among all eligible labelled pixels) is fixed by ``seed``. Every
    epoch hands it out in a new order, stream ``s`` of ``n`` taking positions
    ``s, s + n, ...``; ``repeat=False`` stops after one epoch (validation).
    A class present with fewer eligible pixels than ``count`` raises
    :class:`InputError` unless ``allow_fewer`` (then all of them are used).
    Neighbourhoods are read once per process, a window at a time, and kept in
    memory (the few-label setting: thousands of pixels, not millions).
    """

    MAX_CACHE_BYTES = 2 << 30

    def __init__(
        self,
        stores: Sequence[Store],
        modalities: Sequence[str],
        patch: int,
        count: int,
        *,
        per_class: bool = True,
        repeat: bool = True,
        split: SpatialSplit | None = None,
        subset: str = "train",
        allow_fewer: bool = False,
        class_names: Sequence[str] = (),
        window: int = DEFAULT_WINDOW,
        seed: int = 0,
        threads: int = 4,
    ) -> None:
        if patch < 1 or patch % 2 == 0:
            raise InputError(f"the pixel neighbourhood must be an odd number of pixels, got {patch}")
        if count < 1:
            raise InputError(f"pixels per class must be >= 1, got {count}")
        self.readers = _open_readers(stores)
        self.paths = [r.path for r in self.readers]
        self.modalities = list(modalities)
        self.patch, self.margin, self.count = int(patch), int(patch) // 2, int(count)
        self.per_class, self.repeat = bool(per_class), bool(repeat)
        self.split, self.subset = split, subset
        self.class_names = list(class_names)
        self.seed = int(seed)
        self.windows_px = [aligned_window(window, min(r.chunk)) for r in self.readers]
        self.pixels = self._select(allow_fewer, threads)
        self._cache: tuple[dict[str, np.ndarray], np.ndarray] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _extents(self) -> list[tuple[int, int, int, int, int]]:
        out = []
        for store, (reader, window) in enumerate(zip(self.readers, self.windows_px)):
            h, w = reader.shape
            for y0, y1 in window_blocks(h, window):
                for x0, x1 in window_blocks(w, window):
                    out.append((store, y0, y1, x0, x1))
        return out

    def _read_around(self, extent, names) -> tuple[dict[str, np.ndarray], tuple[int, int, int, int], tuple[int, int, int, int]]:
        """Read a window plus the margin (clipped to the scene): arrays, their extent, and the clipped-off pad."""
        store, y0, y1, x0, x1 = extent
        h, w = self.readers[store].shape
        m = self.margin
        ry0, ry1, rx0, rx1 = max(0, y0 - m), min(h, y1 + m), max(0, x0 - m), min(w, x1 + m)
        arrays = self.readers[store].read(ry0, ry1, rx0, rx1, names)
        pad = (ry0 - (y0 - m), (y1 + m) - ry1, rx0 - (x0 - m), (x1 + m) - rx1)
        return arrays, (ry0, ry1, rx0, rx1), pad

    def _eligible(self, extent) -> tuple[np.ndarray, np.ndarray]:
        """(eligible mask, masked label) over a window's own pixels."""
        arrays, (ry0, ry1, rx0, rx1), pad = self._read_around(extent, ["valid", "label"])
        store, y0, y1, x0, x1 = extent
        region = None if self.split is None else self.split.region(store, self.subset, ry0, ry1, rx0, rx1)
        ok = labelled_pixels(arrays["valid"], arrays["label"], region, self.margin, pad)
        label = _masked_label(arrays)[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
        return ok, label

    def _count(self, extent) -> np.ndarray:
        store, y0, y1, x0, x1 = extent
        if not _touches(self.split, self.subset, store, y0, y1, x0, x1):
            return np.zeros(256, dtype=np.int64)
        ok, label = self._eligible(extent)
        return np.bincount(label[ok], minlength=256)

    def _name(self, k: int) -> str:
        return f"{self.class_names[k]!r} ({k})" if k < len(self.class_names) else str(k)

    def _select(self, allow_fewer: bool, threads: int) -> np.ndarray:
        for path, reader in zip(self.paths, self.readers):
            if not reader.has("label"):
                raise InputError(f"{path} has no labels: ingest it with --labels PATH to train on it")
        extents = self._extents()
        with ThreadPoolExecutor(max(1, threads)) as pool:
            counts = np.array(list(pool.map(self._count, extents)), dtype=np.int64).reshape(-1, 256)
        totals = counts.sum(axis=0)
        present = [k for k in range(IGNORE) if totals[k] > 0]
        if not present:
            raise InputError(f"no valid labelled pixels in the {self.subset} area of the stores: check the labels and the split")
        if self.per_class:
            short = [k for k in present if totals[k] < self.count]
            if short and not allow_fewer:
                k = short[0]
                raise InputError(
                    f"class {self._name(k)} has only {totals[k]} labelled pixels in the {self.subset} area, "
                    f"fewer than the {self.count} requested: lower --pixels-per-class or pass --allow-fewer"
                )
            buckets = {k: counts[:, k] for k in present}  # class -> eligible pixels per window
        else:
            if totals[:IGNORE].sum() < self.count and not allow_fewer:
                raise InputError(f"only {totals[:IGNORE].sum()} labelled pixels in the {self.subset} area, fewer than the {self.count} requested")
            buckets = {None: counts[:, :IGNORE].sum(axis=1)}
        rng = np.random.default_rng([self.seed, 0x5E1EC7])
        wanted: dict[int, list[tuple[int | None, int]]] = {}  # window -> [(bucket, rank among its pixels there)]
        for bucket, per_window in buckets.items():
            ends = np.cumsum(per_window)
            ranks = np.sort(rng.choice(ends[-1], size=min(self.count, ends[-1]), replace=False))
            windows = np.searchsorted(ends, ranks, side="right")
            for window, rank in zip(windows.tolist(), ranks.tolist()):
                wanted.setdefault(window, []).append((bucket, rank - int(ends[window] - per_window[window])))
        rows = []
        for window in sorted(wanted):
            store, y0, _, x0, _ = extents[window]
            ok, label = self._eligible(extents[window])
            for bucket, rank in wanted[window]:
                flat = np.flatnonzero(ok if bucket is None else ok & (label == bucket))[rank]
                i, j = divmod(int(flat), ok.shape[1])
                rows.append((store, y0 + i, x0 + j, int(label[i, j])))
        pixels = np.array(sorted(rows, key=lambda r: (r[3], r[0], r[1], r[2])), dtype=np.int64)
        return pixels

    @property
    def classes(self) -> dict[int, int]:
        """Selected pixels per class."""
        values, counts = np.unique(self.pixels[:, 3], return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    def _load(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Neighbourhoods of all selected pixels, decoding each window that holds some once."""
        if self._cache is not None:
            return self._cache
        p, m, n = self.patch, self.margin, len(self.pixels)
        data: dict[str, np.ndarray] = {}
        labels = np.empty((n, p, p), dtype=np.uint8)
        by_window: dict[tuple[int, int, int], list[int]] = {}
        for row, (store, y, x, _) in enumerate(self.pixels.tolist()):
            window = self.windows_px[store]
            by_window.setdefault((store, y // window, x // window), []).append(row)
        for (store, wy, wx), rows in sorted(by_window.items()):
            window = self.windows_px[store]
            h, w = self.readers[store].shape
            extent = (store, wy * window, min(h, (wy + 1) * window), wx * window, min(w, (wx + 1) * window))
            arrays, read_extent, _ = self._read_around(extent, [*self.modalities, "label", "valid"])
            label = _masked_label(arrays)
            for row in rows:
                _, y, x, _ = self.pixels[row]
                for name in self.modalities:
                    if name not in data:
                        channels = arrays[name].shape[0]
                        size = n * channels * p * p * arrays[name].dtype.itemsize
                        if size > self.MAX_CACHE_BYTES:
                            raise InputError(f"{n} labelled pixels of {p} x {p} need {size >> 20} MB: lower --pixels-per-class")
                        data[name] = np.empty((n, channels, p, p), dtype=arrays[name].dtype)
                    data[name][row] = cut_reflect(arrays[name], read_extent, y - m, x - m, p)
                labels[row] = cut_reflect(label, read_extent, y - m, x - m, p)
        self._cache = (data, labels)
        return self._cache

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0) -> Iterator[Sample]:
        """Endless samples of ``stream``, epoch after epoch, skipping the first ``start``."""
        data, labels = self._load()
        n = len(self.pixels)
        per_epoch = len(range(stream, n, streams))
        if per_epoch == 0:
            if not self.repeat:
                return
            raise InputError(f"{n} labelled pixels cannot feed {streams} workers: lower --workers")
        epoch, offset = divmod(int(start), per_epoch)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            dihedral = rng.integers(0, 8, size=n)
            for position in range(stream + offset * streams, n, streams):
                row = int(order[position])
                store, y, x, _ = (int(v) for v in self.pixels[row])
                yield Sample(
                    store,
                    y - self.margin,
                    x - self.margin,
                    {name: data[name][row] for name in self.modalities},
                    labels[row],
                    int(dihedral[position]),
                )
            if not self.repeat:
                return
            epoch, offset = epoch + 1, 0


class GridPatchSampler:
    """Every tile of a regular grid over a split, once (validation).

    Tiles of ``tile`` px whose targets (the tile less ``margin``) cover the
    grid once; a tile is used when it lies wholly in the split's region and its
    target holds a labelled pixel. Stream ``s`` of ``n`` takes windows
    ``s, s + n, ...``; each window is decoded once.
    """

    def __init__(
        self,
        stores: Sequence[Store],
        modalities: Sequence[str],
        tile: int,
        *,
        margin: int = 0,
        split: SpatialSplit | None = None,
        subset: str = "val",
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.readers = _open_readers(stores)
        self.paths = [r.path for r in self.readers]
        self.modalities = list(modalities)
        self.tile, self.margin = int(tile), int(margin)
        self.split, self.subset = split, subset
        self.windows_px = [aligned_window(window, min(r.chunk)) for r in self.readers]

    def _windows(self) -> list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]]:
        """(store, row origins, column origins) of every window that holds tile origins."""
        out = []
        for store, (reader, window) in enumerate(zip(self.readers, self.windows_px)):
            h, w = reader.shape
            rows, cols = grid_origins(h, self.tile, self.margin), grid_origins(w, self.tile, self.margin)
            for y0, y1 in window_blocks(h, window):
                for x0, x1 in window_blocks(w, window):
                    r = [o for o in rows if y0 <= o[0] < y1]
                    c = [o for o in cols if x0 <= o[0] < x1]
                    if r and c and _touches(self.split, self.subset, store, r[0][0], r[-1][0] + self.tile, c[0][0], c[-1][0] + self.tile):
                        out.append((store, r, c))
        return out

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0) -> Iterator[Sample]:
        """The tiles of this stream's windows (``start`` is ignored: validation always runs whole)."""
        t, m = self.tile, self.margin
        for store, rows, cols in self._windows()[stream::streams]:
            y0, y1, x0, x1 = rows[0][0], rows[-1][0] + t, cols[0][0], cols[-1][0] + t
            arrays = self.readers[store].read(y0, y1, x0, x1, [*self.modalities, "label", "valid"])
            label = _masked_label(arrays)
            region = None if self.split is None else self.split.region(store, self.subset, y0, y1, x0, x1)
            for oy, owned_y in rows:
                for ox, owned_x in cols:
                    i, j = oy - y0, ox - x0
                    if region is not None and not region[i : i + t, j : j + t].all():
                        continue
                    target = label[i : i + t, j : j + t].copy()
                    target[: owned_y - oy, :] = IGNORE
                    target[:, : owned_x - ox] = IGNORE
                    if not (target[m : t - m, m : t - m] != IGNORE).any():
                        continue
                    yield Sample(store, oy, ox, {n: arrays[n][:, i : i + t, j : j + t] for n in self.modalities}, target)
