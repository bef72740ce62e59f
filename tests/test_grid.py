import itertools

import numpy as np
import pytest

from tilefuse.errors import InputError
from tilefuse.grid import Block, TileGrid, reflect_index

CASES = [
    # height, width, tile, overlap, margin, block
    (97, 131, 32, 8, 0, 64),
    (64, 64, 32, 0, 0, 64),
    (65, 200, 32, 31, 0, 32),
    (20, 17, 32, 8, 0, 64),  # scene smaller than a tile
    (1, 1, 8, 2, 1, 16),
    (300, 129, 48, 16, 5, 128),
    (2100, 70, 256, 64, 0, 2048),  # last block owns no tile: all spill
]


def _coverage(grid: TileGrid) -> np.ndarray:
    count = np.zeros((grid.height, grid.width), int)
    for block in grid.blocks():
        rows, cols = grid.block_tiles(block)
        for r, c in itertools.product(rows, cols):
            count[r : r + grid.tile, c : c + grid.tile] += 1
    return count


@pytest.mark.parametrize("case", CASES)
def test_every_pixel_covered_and_every_tile_owned_once(case):
    grid = TileGrid(*case)
    assert _coverage(grid).min() >= 1
    owned = [
        (int(r), int(c))
        for block in grid.blocks()
        for r, c in itertools.product(*grid.block_tiles(block))
    ]
    expected = list(itertools.product(grid.row_origins.tolist(), grid.col_origins.tolist()))
    assert sorted(owned) == sorted(expected) and len(set(owned)) == len(owned) == grid.num_tiles


@pytest.mark.parametrize("case", CASES)
def test_no_redundant_tiles(case):
    grid = TileGrid(*case)
    for origins, size in ((grid.row_origins, grid.height), (grid.col_origins, grid.width)):
        assert origins[0] == 0 and np.all(np.diff(origins) == grid.stride)
        assert origins[-1] + grid.tile >= size
        if len(origins) > 1:
            assert origins[-2] + grid.tile < size, "the tile before the last one already reaches the edge"


@pytest.mark.parametrize("case", CASES)
def test_blocks_tile_the_scene_and_spill_only_into_next_neighbours(case):
    grid = TileGrid(*case)
    seen = np.zeros((grid.height, grid.width), int)
    for block in grid.blocks():
        rows, cols = grid.block_region(block)
        assert rows.start % grid.block == 0 and cols.start % grid.block == 0, "blocks are aligned"
        seen[rows, cols] += 1
        ext_rows, ext_cols = grid.block_extent(block)
        assert ext_rows.start == rows.start and ext_cols.start == cols.start
        assert rows.stop <= ext_rows.stop <= min(grid.height, rows.stop + grid.block)
        assert cols.stop <= ext_cols.stop <= min(grid.width, cols.stop + grid.block)
        for r, c in itertools.product(*grid.block_tiles(block)):
            assert min(r + grid.tile, grid.height) <= ext_rows.stop
            assert min(c + grid.tile, grid.width) <= ext_cols.stop
    assert np.all(seen == 1)


@pytest.mark.parametrize("case", CASES)
def test_input_window_holds_tiles_plus_margin_reflected(case):
    grid = TileGrid(*case)
    for block in grid.blocks():
        window = grid.input_window(block)
        rows, cols = grid.block_tiles(block)
        if not len(rows) or not len(cols):
            assert window is None
            continue
        assert window.row0 == rows[0] - grid.margin and window.col0 == cols[0] - grid.margin
        assert len(window.rows) == rows[-1] - rows[0] + grid.tile + 2 * grid.margin
        assert len(window.cols) == cols[-1] - cols[0] + grid.tile + 2 * grid.margin
        read_rows, read_cols = window.read
        assert 0 <= read_rows.start and read_rows.stop <= grid.height
        assert 0 <= read_cols.start and read_cols.stop <= grid.width
        inside = (window.row0 >= 0) and (window.row0 + len(window.rows) <= grid.height)
        inside &= (window.col0 >= 0) and (window.col0 + len(window.cols) <= grid.width)
        assert window.needs_padding != inside


@pytest.mark.parametrize("size", [2, 3, 5, 17])
def test_reflect_index_matches_numpy_reflect_padding(size):
    values = np.arange(size) * 10
    pad = 3 * size + 1
    padded = np.pad(values, pad, mode="reflect")
    assert np.array_equal(values[reflect_index(-pad, size + pad, size)], padded)


def test_reflect_index_of_a_single_pixel_axis():
    assert np.array_equal(reflect_index(-4, 5, 1), np.zeros(9, int))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tile": 10, "margin": 5}, "larger than twice the model's margin"),
        ({"tile": 32, "overlap": 32}, "smaller than the tile"),
        ({"tile": 32, "overlap": -1}, "overlap"),
        ({"tile": 64, "block": 32}, "at least the tile size"),
    ],
)
def test_bad_geometry_is_an_input_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        TileGrid(100, 100, **kwargs)


def test_blocks_are_row_major():
    grid = TileGrid(130, 70, 32, 8, block=64)
    assert grid.blocks() == [Block(r, c) for r in range(3) for c in range(2)]


@pytest.mark.parametrize("height,width,tile,overlap,block", [(100, 70, 16, 4, 32), (300, 301, 64, 0, 64), (50, 50, 32, 31, 96), (10, 500, 8, 2, 40)])
def test_tiles_per_block_bounds_every_block_and_is_reached(height, width, tile, overlap, block):
    grid = TileGrid(height, width, tile, overlap, block=block)
    owned = [len(rows) * len(cols) for rows, cols in (grid.block_tiles(b) for b in grid.blocks())]
    assert 0 < max(owned) <= grid.tiles_per_block <= grid.num_tiles
    per_edge = -(-block // grid.stride)
    rows, cols = (min(per_edge - 1, len(origins)) for origins in (grid.row_origins, grid.col_origins))
    assert max(owned) >= rows * cols, "the bound is tight up to a row and a column"
