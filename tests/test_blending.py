import numpy as np
import pytest

from tilefuse.blending import FLOOR, GAUSSIAN_SIGMA, WINDOWS, tile_weights, window_1d
from tilefuse.errors import InputError


@pytest.mark.parametrize("kind", WINDOWS)
@pytest.mark.parametrize("tile, overlap", [(1, 0), (7, 3), (32, 8), (64, 0), (33, 32)])
def test_windows_are_positive_symmetric_with_peak_one(kind, tile, overlap):
    weights = tile_weights(kind, tile, overlap)
    assert weights.shape == (tile, tile) and weights.dtype == np.float32
    assert weights.min() >= FLOOR * (1 - 1e-6) and weights.max() == pytest.approx(1.0)
    np.testing.assert_allclose(weights, weights[::-1, ::-1], rtol=1e-6)
    np.testing.assert_allclose(weights, weights.T, rtol=1e-6)
    assert not weights.flags.writeable, "cached windows are shared: they must be read-only"


def test_gaussian_has_the_monai_sigma():
    tile = 64
    line = window_1d("gaussian", tile)
    # the log of a gaussian is a parabola whose second difference is -1 / sigma^2
    curvature = np.diff(np.log(line), 2)
    np.testing.assert_allclose(curvature, -1 / (GAUSSIAN_SIGMA * tile) ** 2, rtol=1e-9)
    assert np.argmax(line) in (tile // 2 - 1, tile // 2)


def test_hann_sums_to_a_constant_at_half_overlap():
    tile = 32
    line = window_1d("hann", tile)
    total = line[: tile // 2] + line[tile // 2 :]
    np.testing.assert_allclose(total, total[0], rtol=1e-12)


@pytest.mark.parametrize("tile, overlap", [(32, 8), (20, 10), (9, 1)])
def test_cosine_ramps_sum_to_a_constant_across_the_overlap(tile, overlap):
    line = window_1d("cosine", tile, overlap)
    stride = tile - overlap
    total = line[stride:] + line[:overlap]
    np.testing.assert_allclose(total, total[0], rtol=1e-12)
    assert np.all(line[overlap : tile - overlap] == line.max())


def test_constant_is_ones():
    assert np.all(tile_weights("constant", 16, 4) == 1.0)


def test_unknown_window_is_an_input_error():
    with pytest.raises(InputError, match="unknown blend window 'box'"):
        tile_weights("box", 16)
