"""Tile grids and output blocks over a scene: pure geometry, no I/O.

A :class:`TileGrid` lays square tiles of ``tile`` output pixels over an
``height x width`` scene at stride ``tile - overlap``, starting at pixel 0 on
both axes. The last tile of an axis may run past the scene edge (and a single
tile covers a scene smaller than a tile): those pixels are read with
reflection padding and cropped from the output, so every scene pixel is covered
and every tile has the same shape.

Work is split into square output blocks of ``block`` pixels aligned to the
prediction store's chunks. A tile belongs to the block holding its origin
(top-left output pixel), so each tile runs once. Because ``tile <= block``, a
block's tiles spill at most into its right, lower and lower-right neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tilefuse.errors import InputError
from tilefuse.scene import SHARD


class Block(NamedTuple):
    """Index of an output block: ``row``-th block down, ``col``-th across."""

    row: int
    col: int


@dataclass(frozen=True)
class InputWindow:
    """What a block reads: virtual pixels ``[row0, row0 + len(rows))`` and likewise for columns.

    ``rows[i]`` is the scene row that virtual row ``row0 + i`` takes its value
    from (itself inside the scene, its mirror image outside: reflection
    padding). ``read`` is the smallest scene region holding all of them.
    """

    row0: int
    col0: int
    rows: np.ndarray
    cols: np.ndarray

    @property
    def read(self) -> tuple[slice, slice]:
        return (slice(int(self.rows.min()), int(self.rows.max()) + 1), slice(int(self.cols.min()), int(self.cols.max()) + 1))

    @property
    def needs_padding(self) -> bool:
        """False when the window is one plain rectangle of the scene (no reflected pixels)."""
        rows, cols = self.read
        return not (
            np.array_equal(self.rows, np.arange(rows.start, rows.stop))
            and np.array_equal(self.cols, np.arange(cols.start, cols.stop))
        )


def reflect_index(start: int, stop: int, size: int) -> np.ndarray:
    """Scene indices for virtual indices ``start..stop-1`` of an axis of ``size`` under reflection.

    Reflection mirrors about the edge pixels without repeating them
    (``-1 -> 1``, ``size -> size - 2``), like ``numpy.pad(mode="reflect")``,
    and repeats as often as needed; an axis of one pixel maps everything to 0.
    """
    index = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index < size, index, period - index)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile`` output pixels at stride ``tile - overlap`` over a scene, grouped in output blocks."""

    height: int
    width: int
    tile: int
    overlap: int = 0
    margin: int = 0
    """Input pixels the model needs beyond each tile's output on every side."""
    block: int = SHARD
    """Output block edge in pixels (a multiple of the prediction store's chunk edge)."""

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise InputError(f"the scene is empty ({self.height} x {self.width} px)")
        if self.margin < 0:
            raise InputError(f"model margin must be >= 0, got {self.margin}")
        if self.tile <= 2 * self.margin or self.tile < 1:
            raise InputError(
                f"tile {self.tile} px must be larger than twice the model's margin ({self.margin} px): pass a larger --tile"
            )
        if not 0 <= self.overlap < self.tile:
            raise InputError(f"overlap {self.overlap} px must be >= 0 and smaller than the tile ({self.tile} px)")
        if self.block < self.tile:
            raise InputError(f"block size {self.block} px must be at least the tile size ({self.tile} px): raise --block-size")

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    def _origins(self, size: int) -> np.ndarray:
        count = 1 if size <= self.tile else -(-(size - self.tile) // self.stride) + 1
        return np.arange(count) * self.stride

    @property
    def row_origins(self) -> np.ndarray:
        """Output row of the top edge of every tile row."""
        return self._origins(self.height)

    @property
    def col_origins(self) -> np.ndarray:
        """Output column of the left edge of every tile column."""
        return self._origins(self.width)

    @property
    def num_tiles(self) -> int:
        return len(self.row_origins) * len(self.col_origins)

    @property
    def tiles_per_block(self) -> int:
        """The most tiles one block owns: origins ``stride`` apart along each of its edges, at most the scene's."""
        per_edge = -(-self.block // self.stride)
        return min(per_edge, len(self.row_origins)) * min(per_edge, len(self.col_origins))

    @property
    def shape_in_blocks(self) -> tuple[int, int]:
        return -(-self.height // self.block), -(-self.width // self.block)

    def blocks(self) -> list[Block]:
        """Every output block, in row-major order (the order work is scheduled in)."""
        rows, cols = self.shape_in_blocks
        return [Block(r, c) for r in range(rows) for c in range(cols)]

    def block_region(self, block: Block) -> tuple[slice, slice]:
        """Scene pixels a block writes (its own region, clipped to the scene)."""
        r0, c0 = block.row * self.block, block.col * self.block
        return slice(r0, min(r0 + self.block, self.height)), slice(c0, min(c0 + self.block, self.width))

    def block_tiles(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """Row and column origins of the tiles a block owns (their origin lies in the block)."""
        rows, cols = self.block_region(block)
        r, c = self.row_origins, self.col_origins
        return r[(r >= rows.start) & (r < rows.stop)], c[(c >= cols.start) & (c < cols.stop)]

    def block_extent(self, block: Block) -> tuple[slice, slice]:
        """Scene pixels a block's tiles cover: its own region plus the strips they spill into neighbours."""
        own_rows, own_cols = self.block_region(block)
        rows, cols = self.block_tiles(block)
        row_end = max(own_rows.stop, min(int(rows.max()) + self.tile, self.height)) if len(rows) else own_rows.stop
        col_end = max(own_cols.stop, min(int(cols.max()) + self.tile, self.width)) if len(cols) else own_cols.stop
        return slice(own_rows.start, row_end), slice(own_cols.start, col_end)

    def input_window(self, block: Block) -> InputWindow | None:
        """The input a block reads: its tiles plus the model margin, reflected at the scene edges.

        None when the block owns no tile (a narrow last block covered by its neighbours' spill).
        """
        rows, cols = self.block_tiles(block)
        if not len(rows) or not len(cols):
            return None
        row0, col0 = int(rows[0]) - self.margin, int(cols[0]) - self.margin
        row1 = int(rows[-1]) + self.tile + self.margin
        col1 = int(cols[-1]) + self.tile + self.margin
        return InputWindow(row0, col0, reflect_index(row0, row1, self.height), reflect_index(col0, col1, self.width))
