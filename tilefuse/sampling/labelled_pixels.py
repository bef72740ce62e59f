"""Labelled pixels (S²Fin, few labels): a fixed number of labelled pixels per class with their neighbourhoods.

The set is drawn once per seed from a count of the eligible labelled pixels
of every window (one pass over ``valid`` and ``label``; with ``index=`` the
per-store counts come from, and are kept for, a saved copy keyed by the
store's identity and the settings), then handed out in a new order every epoch;
neighbourhoods are reflect-padded at scene edges.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.sampling.base import DEFAULT_WINDOW, Sample, StoreSampler
from tilefuse.sampling.geometry import aligned_window, cut_reflect, labelled_pixels, masked_label, window_blocks
from tilefuse.sampling.index import IndexCache
from tilefuse.sampling.reader import Store
from tilefuse.sampling.split import SpatialSplit
from tilefuse.scene import IGNORE


class LabelledPixelSampler(StoreSampler):
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
    :attr:`present` holds the class ids with an eligible pixel in the area (a
    class of the model absent from it is never drawn).
    """

    MAX_CACHE_BYTES = 2 << 30
    _transient = ("_cache",)

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
        index: IndexCache | None = None,
    ) -> None:
        if patch < 1 or patch % 2 == 0:
            raise InputError(f"the pixel neighbourhood must be an odd number of pixels, got {patch}")
        if count < 1:
            raise InputError(f"pixels per class must be >= 1, got {count}")
        super().__init__(stores, modalities, split=split, subset=subset, seed=seed)
        self.patch, self.margin, self.count = int(patch), int(patch) // 2, int(count)
        self.per_class, self.repeat = bool(per_class), bool(repeat)
        self.class_names = list(class_names)
        self.present: tuple[int, ...] = ()
        """Class ids with at least one eligible labelled pixel in ``subset`` (set by the selection)."""
        self.windows_px = [aligned_window(window, min(r.chunk)) for r in self.readers]
        self.pixels = self._select(allow_fewer, threads, index)
        self._cache: tuple[dict[str, np.ndarray], np.ndarray] | None = None

    def _extents(self, store: int) -> list[tuple[int, int, int, int, int]]:
        h, w = self.readers[store].shape
        window = self.windows_px[store]
        return [(store, y0, y1, x0, x1) for y0, y1 in window_blocks(h, window) for x0, x1 in window_blocks(w, window)]

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
        region = self.region(store, ry0, ry1, rx0, rx1)
        ok = labelled_pixels(arrays["valid"], arrays["label"], region, self.margin, pad)
        label = masked_label(arrays)[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
        return ok, label

    def _count(self, extent) -> np.ndarray:
        store, y0, y1, x0, x1 = extent
        if not self.touches(store, y0, y1, x0, x1):
            return np.zeros(256, dtype=np.int64)
        ok, label = self._eligible(extent)
        return np.bincount(label[ok], minlength=256)

    def _name(self, k: int) -> str:
        return f"{self.class_names[k]!r} ({k})" if k < len(self.class_names) else str(k)

    def _select(self, allow_fewer: bool, threads: int, cache: IndexCache | None) -> np.ndarray:
        self.require_labels()
        extents, parts = [], []
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for store in range(len(self.readers)):
                mine = self._extents(store)
                build = lambda: {"counts": np.array(list(pool.map(self._count, mine)), dtype=np.int64).reshape(-1, 256)}  # noqa: E731
                settings = {"margin": self.margin, "window": self.windows_px[store]}
                extents.extend(mine)
                parts.append(self.store_index(cache, "pixels", store, settings, build)["counts"])
        counts = np.concatenate(parts)
        totals = counts.sum(axis=0)
        present = [k for k in range(IGNORE) if totals[k] > 0]
        self.present = tuple(present)
        if not present:
            raise InputError(f"no valid labelled pixels in the {self.subset} area of the stores: check the labels and the split")
        if self.per_class:
            short = [k for k in present if totals[k] < self.count]
            if short and not allow_fewer:
                k = short[0]
                raise InputError(
                    f"class {self._name(k)} has only {totals[k]} labelled pixels in the {self.subset} area, "
                    f"fewer than the {self.count} requested: lower pixels_per_class= (--pixels-per-class) or pass allow_fewer=True (--allow-fewer)"
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
            label = masked_label(arrays)
            for row in rows:
                _, y, x, _ = self.pixels[row]
                for name in self.modalities:
                    if name not in data:
                        channels = arrays[name].shape[0]
                        size = n * channels * p * p * arrays[name].dtype.itemsize
                        if size > self.MAX_CACHE_BYTES:
                            raise InputError(f"{n} labelled pixels of {p} x {p} need {size >> 20} MB: lower pixels_per_class= (--pixels-per-class)")
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
            raise InputError(f"{n} labelled pixels cannot feed {streams} workers: lower workers= (--workers)")
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
