"""Grid patches (validation): every tile of a regular grid over a split, once.

No index pass: which windows hold tiles of the subset follows from geometry
and the split alone; each window is decoded once while streaming.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from tilefuse.sampling.base import DEFAULT_WINDOW, Sample, StoreSampler
from tilefuse.sampling.geometry import aligned_window, grid_origins, masked_label, window_blocks
from tilefuse.sampling.reader import Store
from tilefuse.sampling.split import SpatialSplit
from tilefuse.scene import IGNORE


class GridPatchSampler(StoreSampler):
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
        super().__init__(stores, modalities, split=split, subset=subset)
        self.tile, self.margin = int(tile), int(margin)
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
                    if r and c and self.touches(store, r[0][0], r[-1][0] + self.tile, c[0][0], c[-1][0] + self.tile):
                        out.append((store, r, c))
        return out

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0) -> Iterator[Sample]:
        """The tiles of this stream's windows (``start`` is ignored: validation always runs whole)."""
        t, m = self.tile, self.margin
        for store, rows, cols in self._windows()[stream::streams]:
            y0, y1, x0, x1 = rows[0][0], rows[-1][0] + t, cols[0][0], cols[-1][0] + t
            arrays = self.readers[store].read(y0, y1, x0, x1, [*self.modalities, "label", "valid"])
            label = masked_label(arrays)
            region = self.region(store, y0, y1, x0, x1)
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
