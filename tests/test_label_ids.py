"""Label ids match exactly, whatever their size: 8-10 digit crop codes (EuroCrops HCAT) are remapped by
``label_map`` without two codes merging, through ``tilefuse ingest`` and ``tilefuse.from_xarray`` alike.

Labels were read as float32, which holds integers exactly only up to 2^24: 33010101 became 33010100 (its
pixels went to that class without a word) and 10-digit codes all became one value. Ids beyond 2^53 (what
float64 holds exactly) are refused, naming the id.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine

import tilefuse
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.scene import open_scene

CRS = "EPSG:32633"
H, W = 30, 40
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)
CODES = {
    # HCAT-style 8-digit codes 1 apart (float32 spacing there is 2), the nodata code among them
    "8-digit": (33010100, 33010101, 33010104, 33010103),
    # 10-digit codes that fit int32 (float32 rounded all of them to 2101010176)
    "10-digit": (2101010100, 2101010101, 2101010199, 2101010150),
}


def label_codes(kind: str, dtype: str, seed: int = 1) -> tuple[np.ndarray, dict[int, int], int, np.ndarray]:
    """(codes (H, W) of ``dtype``, label_map, nodata code, the ids a scene must hold: 255 at nodata)."""
    *classes, nodata = CODES[kind]
    picks = np.random.default_rng(seed).integers(0, len(classes) + 1, (H, W))
    codes = np.array([*classes, nodata], dtype=dtype)[picks]
    mapping = {code: k for k, code in enumerate(classes)}
    want = np.where(picks == len(classes), 255, picks).astype(np.uint8)
    return codes, mapping, nodata, want


def counts(ids: np.ndarray) -> dict[int, int]:
    values, n = np.unique(ids, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, n)}


def write_tif(path, data: np.ndarray, nodata=None):
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(
        path, "w", driver="GTiff", width=W, height=H, count=data.shape[0], dtype=data.dtype.name,
        crs=CRS, transform=TRANSFORM, nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def optical_tif(tmp_path):
    return write_tif(tmp_path / "optical.tif", np.random.default_rng(0).random((2, H, W)).astype(np.float32))


def ingest(tmp_path, capsys, labels, label_map: dict[int, int], *extra) -> tuple[int, str]:
    args = ["ingest", tmp_path / "s.zarr", "-m", f"optical={optical_tif(tmp_path)}", "--labels", labels, *extra]
    if label_map:
        args += ["--label-map", ",".join(f"{k}:{v}" for k, v in label_map.items())]
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def array(data: np.ndarray) -> xr.DataArray:
    x = TRANSFORM.c + TRANSFORM.a * (np.arange(data.shape[-1]) + 0.5)
    y = TRANSFORM.f + TRANSFORM.e * (np.arange(data.shape[-2]) + 0.5)
    dims = ("band", "y", "x") if data.ndim == 3 else ("y", "x")
    coords = {"y": y, "x": x, **({"band": np.arange(1, data.shape[0] + 1)} if data.ndim == 3 else {})}
    return xr.DataArray(data, dims=dims, coords=coords).rio.write_crs(CRS)


def optical_array() -> xr.DataArray:
    return array(np.random.default_rng(0).random((2, H, W)).astype(np.float32))


CASES = [("8-digit", "int32"), ("8-digit", "int64"), ("8-digit", "uint32"), ("10-digit", "int32"), ("10-digit", "int64"), ("10-digit", "uint32")]


@pytest.mark.parametrize("kind, dtype", CASES)
def test_ingest_keeps_every_code_apart(tmp_path, capsys, kind, dtype):
    codes, mapping, nodata, want = label_codes(kind, dtype)
    code, err = ingest(tmp_path, capsys, write_tif(tmp_path / "labels.tif", codes, nodata), mapping)
    assert code == 0, err
    got = open_scene(tmp_path / "s.zarr")["label"].values
    assert counts(got) == counts(want)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind, dtype", [("8-digit", "int64"), ("10-digit", "uint32")])
def test_ingest_onto_another_grid_equals_ingest_of_the_mapped_ids(tmp_path, capsys, kind, dtype):
    """Resampled (nearest, onto a 15 m grid): the codes give exactly the scene their mapped ids give."""
    codes, mapping, nodata, want = label_codes(kind, dtype)
    code, err = ingest(tmp_path, capsys, write_tif(tmp_path / "codes.tif", codes, nodata), mapping, "--resolution", 15)
    assert code == 0, err
    got = open_scene(tmp_path / "s.zarr")["label"].values
    (tmp_path / "ids").mkdir()
    code, err = ingest(tmp_path / "ids", capsys, write_tif(tmp_path / "ids.tif", want, 255), {}, "--resolution", 15)
    assert code == 0, err
    expected = open_scene(tmp_path / "ids" / "s.zarr")["label"].values
    assert len(counts(expected)) == 4
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("chunked", [False, True], ids=["numpy", "dask"])
@pytest.mark.parametrize("kind, dtype", CASES)
def test_from_xarray_keeps_every_code_apart(tmp_path, kind, dtype, chunked):
    codes, mapping, nodata, want = label_codes(kind, dtype)
    labels = array(codes).rio.write_nodata(nodata)
    labels = labels.chunk(16) if chunked else labels
    tilefuse.from_xarray(tmp_path / "s.zarr", {"optical": optical_array()}, labels, label_map=mapping)
    got = open_scene(tmp_path / "s.zarr")["label"].values
    assert counts(got) == counts(want)
    np.testing.assert_array_equal(got, want)


def test_from_xarray_equals_ingest_of_the_raster(tmp_path, capsys):
    codes, mapping, nodata, want = label_codes("10-digit", "int64", seed=3)
    code, err = ingest(tmp_path, capsys, write_tif(tmp_path / "labels.tif", codes, nodata), mapping)
    assert code == 0, err
    ds = tilefuse.scene_from_xarray({"optical": optical_array()}, array(codes).rio.write_nodata(nodata), label_map=mapping)
    np.testing.assert_array_equal(ds["label"].values, open_scene(tmp_path / "s.zarr")["label"].values)
    np.testing.assert_array_equal(ds["label"].values, want)


BEYOND = 2**53 + 1  # float64 holds it as 2^53: the first id it cannot tell from its neighbour


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
@pytest.mark.parametrize("chunked", [False, True], ids=["numpy", "dask"])
def test_from_xarray_refuses_an_id_beyond_2_53(tmp_path, dtype, chunked):
    codes = np.full((H, W), 1, dtype)
    codes[7, 9] = BEYOND
    labels = array(codes).chunk(16) if chunked else array(codes)
    with pytest.raises(InputError) as caught:
        tilefuse.from_xarray(tmp_path / "s.zarr", {"optical": optical_array()}, labels, label_map={1: 0})
    message = str(caught.value)
    assert "\n" not in message and f"class id {BEYOND}, beyond 2^53" in message
    assert "labels=" in message and "--" not in message  # the Python API's parameter, not a CLI flag
    assert not (tmp_path / "s.zarr").exists()


def test_from_xarray_takes_a_nodata_beyond_2_53(tmp_path):
    """Only ids are refused: a huge nodata value marks no-data pixels and is never a class id."""
    codes, mapping, _, want = label_codes("10-digit", "int64")
    nodata = 2**62 + 1
    codes[want == 255] = nodata
    ds = tilefuse.scene_from_xarray({"optical": optical_array()}, array(codes).rio.write_nodata(nodata), label_map=mapping)
    np.testing.assert_array_equal(ds["label"].values, want)


def test_ingest_refuses_an_id_beyond_2_53(tmp_path, capsys):
    codes = np.full((H, W), 1, np.int64)
    codes[7, 9] = -BEYOND
    code, err = ingest(tmp_path, capsys, write_tif(tmp_path / "labels.tif", codes), {1: 0})
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"labels.tif holds class id {-BEYOND}, beyond 2^53" in lines[0] and "--labels" in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_a_label_map_key_beyond_2_53_is_refused(tmp_path, capsys):
    """No label value can equal it (those are refused), so it would map nothing without a word."""
    labels = array(np.ones((H, W), np.int64))
    with pytest.raises(InputError, match=rf"^label_map= key {BEYOND} is beyond 2\^53"):
        tilefuse.scene_from_xarray({"optical": optical_array()}, labels, label_map={1: 0, BEYOND: 1})
    code, err = ingest(tmp_path, capsys, write_tif(tmp_path / "labels.tif", np.ones((H, W), np.int64)), {1: 0, BEYOND: 1})
    assert code == 2 and f"label {BEYOND} is beyond 2^53" in err, err
