"""Random patches (segmentation, PAD): uniform over the eligible origins of all stores, chunk-aware.

Read windows are chunk-aligned and overlap by half; an origin whose patch fits
in ``c`` windows weighs ``1/c`` in each. A window is drawn with probability
proportional to its summed weights, decoded once, and several origins are
drawn inside it proportionally to ``1/c``, so every eligible origin keeps
probability ``1/N``; the patches of several windows are shuffled together (a
*round*) so consecutive batches do not come from one place.

Randomness is counter-based: round ``r`` of stream ``s`` draws from a
generator seeded with ``(seed, s, r)``, so the whole RNG state is the number
of samples each stream has handed out.

The index (per store: its windows and their weights per centre class) is one
pass over ``valid`` and ``label``; with ``index=`` (:class:`IndexCache`) it is
taken from, and kept for, a saved copy keyed by the store's identity and the
settings, so a restart skips the pass.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.sampling.base import DEFAULT_WINDOW, Sample, StoreSampler
from tilefuse.sampling.geometry import (
    centre_classes,
    check_patch_fits,
    cover_counts,
    eligible_origins,
    masked_label,
    window_geometry,
    window_starts,
)
from tilefuse.sampling.index import IndexCache
from tilefuse.sampling.reader import Store
from tilefuse.sampling.split import SpatialSplit
from tilefuse.scene import IGNORE


@dataclass
class _WindowTable:
    """Read windows of all stores with their eligible origins per centre class, each weighted 1 / cover count."""

    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))
    """(n, 5): store, first/last+1 row, first/last+1 column of the window read."""
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """(K,): the centre classes that occur, ascending (IGNORE: an unlabelled centre)."""
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    """(n, K): sum over eligible origins of 1 / cover count, per centre class of ``classes`` (about 8 K bytes
    per window, not 2 KB: a country-sized store's table stays small)."""

    def dense(self) -> np.ndarray:
        """``weights`` with one column per label value 0..255, (n, 256)."""
        out = np.zeros((len(self.weights), 256))
        out[:, self.classes] = self.weights
        return out


class RandomPatchSampler(StoreSampler):
    """Random ``patch x patch`` samples, uniform over eligible origins of all stores, chunk-aware.

    Read windows are chunk-aligned squares of about ``window`` px that overlap
    by half (stride = half a window), so a window decodes whole chunks only.
    An origin whose patch fits in ``c`` windows weighs ``1 / c`` in each: a
    round draws ``windows_per_round`` windows with probability proportional
    to their summed weights, decodes each once (every modality, label and
    valid), and draws ``patches_per_window`` origins in it with probability
    proportional to ``1 / c`` (by rejection), so every eligible origin of every
    store has the same probability. The round's patches are handed out in a
    random order. A round's windows are decoded by ``threads`` threads at once
    (as is the index), which changes no draw. With ``class_balance`` an origin also weighs 1 / (count of
    its centre class), so centre classes come out uniform, and only labelled
    centres qualify.
    """

    INDEX_TILE = 1024
    """Edge (px of origins) of the tiles the index reads at once, a band of tiles at a time."""

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
        index: IndexCache | None = None,
    ) -> None:
        super().__init__(stores, modalities, split=split, subset=subset, seed=seed)
        self.patch, self.margin = int(patch), int(margin)
        self.min_labelled, self.class_balance = float(min_labelled), bool(class_balance)
        self.patches_per_window, self.windows_per_round = int(patches_per_window), int(windows_per_round)
        self.threads = max(1, int(threads))
        if self.patch <= 2 * self.margin:
            raise InputError(f"patch size {patch} leaves no output for a model with margin {margin}: pass a larger patch_size= (--patch-size)")
        self.geometry = [window_geometry(window, self.patch, min(r.chunk)) for r in self.readers]
        self.table = self._index(threads, index)
        self.weights = self._window_weights()

    # -- index: one pass over valid + label, weighing eligible origins per window (through stride-grid cells)
    def _inverse_cover(self, store: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """1 / cover count of every origin of a window's extent (shape of its origins)."""
        h, w = self.readers[store].shape
        window, stride = self.geometry[store]
        rows = cover_counts(h, self.patch, window, stride)[y0 : y1 - self.patch + 1]
        cols = cover_counts(w, self.patch, window, stride)[x0 : x1 - self.patch + 1]
        return 1.0 / np.outer(rows, cols)

    def _eligible(self, extent: tuple[int, int, int, int, int], arrays: dict) -> np.ndarray:
        store, y0, y1, x0, x1 = extent
        region = self.region(store, y0, y1, x0, x1)
        ok = eligible_origins(arrays["valid"], arrays["label"], region, self.patch, self.margin, self.min_labelled)
        if self.class_balance:
            ok &= centre_classes(arrays["valid"], arrays["label"], self.patch) != IGNORE
        return ok

    def _cell_sums(self, store: int, cy0: int, cy1: int, cx0: int, cx1: int) -> np.ndarray:
        """Eligible origins of the stride-grid cells ``cy0:cy1`` x ``cx0:cx1`` (a cell: ``stride x stride``
        origins), summed with weight 1 / cover count per quadrant and centre class: ``(rows, cols, 4, 256)``.

        Quadrant ``2 a + b``: ``a`` (``b``) says whether the origin's row (column) in its cell is at
        least ``r = stride - patch + 1``; a window starting at cell ``i`` holds the whole cell ``i``
        and the first ``r`` origins of cell ``i + 1`` along each axis. One read of the cells' origins
        plus the patch (``valid``, ``label``), so every pixel is read about once, not once per
        overlapping window."""
        h, w = self.readers[store].shape
        _, s = self.geometry[store]
        p, r = self.patch, self.geometry[store][1] - self.patch + 1
        oy0, oy1, ox0, ox1 = cy0 * s, min(cy1 * s, h - p + 1), cx0 * s, min(cx1 * s, w - p + 1)
        extent = (store, oy0, oy1 + p - 1, ox0, ox1 + p - 1)
        shape = (cy1 - cy0, cx1 - cx0, 4, 256)
        if not self.touches(*extent):
            return np.zeros(shape)
        arrays = self.readers[store].read(*extent[1:], ["valid", "label"])
        iy, ix = np.nonzero(self._eligible(extent, arrays))
        classes = centre_classes(arrays["valid"], arrays["label"], p)[iy, ix].astype(np.int64)
        cell = (iy // s) * shape[1] + ix // s
        quadrant = 2 * (iy % s >= r) + (ix % s >= r)
        weight = self._inverse_cover(*extent)[iy, ix]
        return np.bincount((cell * 4 + quadrant) * 256 + classes, weights=weight, minlength=int(np.prod(shape))).reshape(shape)

    def _store_table(self, store: int, pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
        """One store's index: its windows holding eligible origins (rows of ``y0, y1, x0, x1``) and their
        weights per centre class, from the cell sums, a band of cell rows at a time (bounded memory)."""
        h, w = self.readers[store].shape
        window, s = self.geometry[store]
        ny, nx = len(window_starts(h, self.patch, s)), len(window_starts(w, self.patch, s))
        k = max(1, self.INDEX_TILE // s)  # cells per tile edge

        def cell_rows():
            for b0 in range(0, ny, k):
                b1 = min(b0 + k, ny)
                tiles = pool.map(lambda c0: self._cell_sums(store, b0, b1, c0, min(c0 + k, nx)), range(0, nx, k))
                yield from np.concatenate(list(tiles), axis=1)

        def window_row(row: np.ndarray, below: np.ndarray | None) -> np.ndarray:
            """Windows of one cell row: their own cell, the first r columns of the next cell (quadrants
            0, 2), the first r rows of the cell below (0, 1) and its next cell's first r x r (0)."""
            out = row.sum(axis=1)
            out[:-1] += row[1:, 0] + row[1:, 2]
            if below is not None:
                out += below[:, 0] + below[:, 1]
                out[:-1] += below[1:, 0]
            return out

        windows, entries, previous = [], [], None  # entries: (window, class, weight) of the non-zero weights
        rows = cell_rows()
        for i in range(ny + 1):
            current = next(rows, None)
            if previous is not None:
                row = window_row(previous, current)
                keep = np.flatnonzero(row.sum(axis=1) > 0)
                kept = row[keep]
                at, label = np.nonzero(kept)
                entries.append((at + len(windows), label, kept[at, label]))
                y0 = (i - 1) * s
                windows.extend((y0, min(y0 + window, h), j * s, min(j * s + window, w)) for j in keep.tolist())
            previous = current
        at, label, value = (np.concatenate(parts) for parts in zip(*entries))
        classes = np.unique(label)
        weights = np.zeros((len(windows), len(classes)))
        weights[at, np.searchsorted(classes, label)] = value
        return {"windows": np.array(windows, dtype=np.int64).reshape(-1, 4), "classes": classes.astype(np.int64), "weights": weights}

    def _index_settings(self, store: int) -> dict:
        """What one store's index depends on besides the store (and its split blocks)."""
        return {
            "patch": self.patch, "margin": self.margin, "min_labelled": self.min_labelled,
            "class_balance": self.class_balance, "geometry": list(self.geometry[store]),
        }

    def _index(self, threads: int, cache: IndexCache | None) -> _WindowTable:
        self.require_labels()
        for path, reader in zip(self.paths, self.readers):
            check_patch_fits(reader.shape, self.patch, path)
        with ThreadPoolExecutor(max(1, threads)) as pool:

            parts = [
                self.store_index(cache, "patches", store, self._index_settings(store), lambda: self._store_table(store, pool))
                for store in range(len(self.readers))
            ]
        windows = [np.column_stack([np.full(len(p["windows"]), store, dtype=np.int64), p["windows"]]) for store, p in enumerate(parts)]
        classes = np.unique(np.concatenate([p["classes"] for p in parts])).astype(np.int64)
        weights = np.zeros((sum(len(p["weights"]) for p in parts), len(classes)))
        start = 0
        for p in parts:
            weights[start : start + len(p["weights"]), np.searchsorted(classes, p["classes"])] = p["weights"]
            start += len(p["weights"])
        table = _WindowTable(np.concatenate(windows).reshape(-1, 5), classes, weights)
        if not len(table.windows):
            what = f"{self.subset} area" if self.split is not None else "stores"
            raise InputError(
                f"no valid labelled patch of {self.patch} px with at least {self.min_labelled:.0%} labelled pixels in the {what}: "
                "check the labels, lower min_labelled= (--min-labelled) or patch_size= (--patch-size)"
            )
        return table

    def _class_weights(self) -> np.ndarray:
        """Weight of one origin by its centre class, per class of the table (ones, or 1 / count with class balancing)."""
        if not self.class_balance:
            return np.ones(len(self.table.classes))
        totals = self.table.weights.sum(axis=0)
        return np.divide(1.0, totals, out=np.zeros(len(totals)), where=totals > 0)

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
            by_label = np.zeros(256)
            by_label[self.table.classes] = self._class_weights()
            weight = weight * by_label[centre_classes(arrays["valid"], arrays["label"], self.patch)]
        flat = np.flatnonzero(ok)
        weight = weight.ravel()[flat]
        if not np.isclose(weight.sum(), self.table.weights[index] @ self._class_weights(), rtol=1e-6, atol=0):
            raise InputError(f"{self.paths[extent[0]]} changed while training: restart the run")
        arrays["label"] = masked_label(arrays)
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
        unique = list(dict.fromkeys(picks.tolist()))
        with ThreadPoolExecutor(min(self.threads, len(unique))) as pool:  # zarr decodes without the GIL
            decoded = dict(zip(unique, pool.map(self._prepare, unique)))
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
