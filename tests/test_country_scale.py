"""Country scale: planning a 10^5 x 10^5 px prediction (no model run) stays small in memory.

The scene store holds metadata and coordinates only (planning reads no pixel
chunk). Everything ``predict`` does before its first block runs is done for
real: options, checkpoint, grid, worker probe, determinism record, store
creation, pending blocks from the manifest (on a resume also the check of
every done block's keys), and the block schedule. Memory is measured with
tracemalloc and bounded far below anything that grows with the pixels (the
labels alone of such a scene are 10^10 bytes); speed is not asserted.
"""

import shutil
import tracemalloc
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from predict_fixtures import CLASSES, MODALITIES, save_pointwise

from tilefuse import storage
from tilefuse.cluster.blocks import plan
from tilefuse.grid import Block
from tilefuse.cluster.run import ClusterRun, PredictOptions, plan_prediction
from tilefuse.prediction import MANIFEST, done_blocks, prediction_attrs, write_block
from tilefuse.scene import STORE_KIND, band_dim, encoding_for

SIDE = 100_000
BLOCK = 2048
MEMORY = 256 << 20
"""Traced peak allowed for planning (measured: about 5 to 20 MiB)."""


def skeleton_scene(path: Path, height: int, width: int) -> Path:
    """A scene store of ``height x width`` px with its metadata, coordinates and band statistics, no pixel written."""

    def lazy(*shape, dtype):  # never computed: to_zarr(compute=False) writes metadata and coordinates only
        return da.zeros(shape, dtype=dtype, chunks=-1)

    data = {name: ((band_dim(name), "y", "x"), lazy(bands, height, width, dtype="float32")) for name, bands in MODALITIES.items()}
    ds = xr.Dataset(
        {**data, "valid": (("y", "x"), lazy(height, width, dtype=bool))},
        coords={"x": 500_000 + 10.0 * np.arange(width) + 5, "y": 4_000_000 - 10.0 * np.arange(height) - 5},
    ).rio.write_crs("EPSG:32632")
    for name in ds.data_vars:  # as write_scene: spatial_ref is then written as every variable's coordinate
        ds[name].encoding = {}
    ds.attrs.update({STORE_KIND: "scene", storage.FORMAT_ATTR: storage.FORMAT, "modalities": list(MODALITIES)})
    for name, bands in MODALITIES.items():
        ds[name].attrs.update(band_mean=[0.0] * bands, band_std=[1.0] * bands, band_count=[height * width] * bands)
    encoding = {name: encoding_for(ds[name]) for name in [*MODALITIES, "valid"]}
    ds.to_zarr(path, mode="w-", zarr_format=3, encoding=storage.with_checksums(ds, encoding), compute=False, consolidated=False)
    with storage.writing():  # a coordinate, read at open: written though it equals the fill value
        zarr.open_array(path / "spatial_ref", mode="r+")[...] = ds["spatial_ref"].values
    storage.consolidate(path)
    return path


@pytest.fixture(scope="module")
def country(tmp_path_factory):
    root = tmp_path_factory.mktemp("country")
    return skeleton_scene(root / "scene.zarr", SIDE, SIDE), save_pointwise(root / "pointwise")


def _planned(checkpoint, scene, out, **options):
    """What ``predict`` does before the first block runs, under tracemalloc: (plan, pending, steps, traced peak)."""
    tracemalloc.start()
    try:
        settings = PredictOptions(block_size=BLOCK, probs="uint8", torch_threads=1, batch_size=4, **options)
        planned = plan_prediction(checkpoint, scene, out, settings)
        with ClusterRun(planned, "sync", progress=False) as run:
            pending = run.prepare()
            steps = plan(planned.grid.blocks(), pending)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return planned, pending, steps, peak


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_planning_a_country_scale_prediction_is_bounded(tmp_path, country):
    scene, checkpoint = country
    out = tmp_path / "pred.zarr"
    planned, pending, steps, peak = _planned(checkpoint, scene, out)
    rows = cols = -(-SIDE // BLOCK)
    assert planned.grid.shape_in_blocks == (rows, cols) and len(pending) == rows * cols
    assert [step.block for step in steps] == pending and all(step.finish for step in steps)
    assert peak < MEMORY, f"planning traced {peak / 2**20:.0f} MiB"
    assert prediction_attrs(out)["torch_threads"] == 1 and not done_blocks(out).any()
    assert _bytes(out) < 16 << 20, "an empty prediction store holds metadata and coordinates only"


def _copy_block_keys(out: Path, source: tuple[int, int], targets) -> None:
    """Give ``targets`` the stored bytes of block ``source`` (same shard shape: intact keys, whatever their place)."""
    for name, lead in (("labels", ()), ("probs", (0,))):
        original = Path(out, storage.chunk_key(name, (*lead, *source)))
        for block in targets:
            target = Path(out, storage.chunk_key(name, (*lead, *block)))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, target)


def test_resuming_a_country_scale_prediction_reads_only_what_is_done(tmp_path, country):
    scene, checkpoint = country
    out = tmp_path / "pred.zarr"
    planned, _, _, _ = _planned(checkpoint, scene, out)
    rows, cols = planned.grid.shape_in_blocks
    block = np.zeros((BLOCK, BLOCK), np.uint8)
    write_block(out, planned.grid.block_region(Block(0, 0)), Block(0, 0), block, np.zeros((len(CLASSES), BLOCK, BLOCK), np.uint8))
    rng = np.random.default_rng(0)
    done = rng.random((rows, cols)) < 0.2
    done[0, 0] = True
    damaged = np.zeros_like(done)
    damaged[rng.integers(0, rows, 7), rng.integers(0, cols, 7)] = True
    damaged[0, 0] = False
    intact = done & ~damaged
    _copy_block_keys(out, (0, 0), [tuple(ij) for ij in np.argwhere(intact) if tuple(ij) != (0, 0)])
    marked = np.argwhere(done | damaged)  # damaged: marked done, but the keys are missing
    zarr.open_group(out, mode="r+")[MANIFEST].set_coordinate_selection(tuple(marked.T), 1)

    _, pending, steps, peak = _planned(checkpoint, scene, out, resume=True)
    assert sorted(pending) == sorted(tuple(ij) for ij in np.argwhere(~intact))
    assert peak < MEMORY, f"resume planning traced {peak / 2**20:.0f} MiB"
    assert np.array_equal(done_blocks(out), intact), "damaged blocks are unmarked"
    written = {step.block for step in steps if step.finish}
    assert written == set(pending) and {step.block for step in steps} - written <= {tuple(ij) for ij in np.argwhere(intact)}


@pytest.mark.parametrize("seed", range(3))
def test_done_blocks_reads_the_markers_present_and_agrees_with_the_whole_manifest(tmp_path, seed):
    scene = skeleton_scene(tmp_path / "scene.zarr", 300 + 37 * seed, 500 - 41 * seed)
    out = tmp_path / "pred.zarr"
    planned = plan_prediction(save_pointwise(tmp_path / "pointwise"), scene, out, PredictOptions(tile=32, block_size=64, torch_threads=1))
    with ClusterRun(planned, "sync", progress=False) as run:
        run.prepare()
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 3, planned.grid.shape_in_blocks)  # 0: never marked, 1: marked done, 2: marked, then unmarked
    with storage.writing():  # an unmarked block keeps a stored 0
        manifest = zarr.open_group(out, mode="r+")[MANIFEST]
    for value, where in ((1, state > 0), (0, state == 2)):
        if where.any():
            manifest.set_coordinate_selection(tuple(np.argwhere(where).T), value)
    assert len(list(Path(out, MANIFEST, "c").rglob("*"))) > 0
    assert np.array_equal(done_blocks(out), state == 1)
    assert np.array_equal(done_blocks(out), zarr.open_group(out)[MANIFEST][...].astype(bool))
