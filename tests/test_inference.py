import itertools

import numpy as np
import pytest
import torch
from predict_fixtures import CALLS, reset_calls, save_pointwise, write_test_scene

import tilefuse
from tilefuse.blending import WINDOWS
from tilefuse.checkpoint import load_checkpoint
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.grid import TileGrid
from tilefuse import inference
from tilefuse.inference import combine
from tilefuse.scene import band_stats, normalise, open_scene


def whole_image_probs(checkpoint, scene_path, stats=None) -> np.ndarray:
    """Softmax of the model run once over the whole scene (reflection-padded by its margin)."""
    model, config = load_checkpoint(checkpoint)
    ds = open_scene(scene_path)
    m = model.spec.margin
    inputs = {}
    for name in config.modalities:
        mean, std = stats[name] if stats else band_stats(ds, name)
        data = normalise(ds[name].values, np.asarray(mean, np.float32), np.asarray(std, np.float32))
        data = np.pad(data, ((0, 0), (m, m), (m, m)), mode="reflect")
        inputs[name] = torch.from_numpy(data)[None]
    with torch.inference_mode():
        return torch.softmax(model(inputs), dim=1)[0].numpy()


def _predict(tmp_path, checkpoint, scene, name, **kwargs):
    kwargs = {"tile": 32, "overlap": 8, "block_size": 64, "probs": "float32", "progress": False, **kwargs}
    return tilefuse.predict(checkpoint, scene, tmp_path / f"{name}.zarr", **kwargs)


@pytest.fixture(scope="module")
def pointwise(tmp_path_factory):
    return save_pointwise(tmp_path_factory.mktemp("ckpt") / "pointwise")


@pytest.mark.parametrize("blend", WINDOWS)
@pytest.mark.parametrize("size", [(97, 131), (20, 17)])
def test_tiled_probabilities_equal_whole_image_inference(tmp_path, pointwise, blend, size):
    scene = write_test_scene(tmp_path / "scene.zarr", *size, seed=sum(size))
    pred = _predict(tmp_path, pointwise, scene, "pred", blend=blend, overlap=12)
    reference = whole_image_probs(pointwise, scene)
    np.testing.assert_allclose(pred["probs"].values, reference, atol=1e-6, rtol=0)
    top2 = np.sort(reference, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-5
    assert np.array_equal(pred["labels"].values[clear], reference.argmax(0)[clear])


@pytest.mark.parametrize("overlap", [20, 27])
def test_overlaps_beyond_half_a_tile_and_skipped_tiles_keep_the_sums_exact(tmp_path, pointwise, overlap, monkeypatch):
    # stride 12 or 5 < overlap: up to 9 or 49 tiles reach a pixel, three or more tile rows share rows of
    # the accumulator's band; the nodata corner leaves blocks with skipped tiles (zero-fill and add) after blocks that filled the bands
    from tilefuse.cluster import run

    monkeypatch.setattr(run, "MIN_STRIDE", 1)  # predict refuses steps below 8 px; the engine computes them exactly
    scene = write_test_scene(tmp_path / "scene.zarr", 90, 77, seed=11, nodata=(slice(55, 90), slice(45, 77)))
    reference = whole_image_probs(pointwise, scene)
    valid = open_scene(scene)["valid"].values
    runs = []
    for block in (32, 64):
        pred = _predict(tmp_path, pointwise, scene, f"pred-{block}", overlap=overlap, block_size=block, batch_size=3)
        probs = pred["probs"].values
        np.testing.assert_allclose(probs[:, valid], reference[:, valid], atol=1e-6, rtol=0)
        assert np.all(pred["labels"].values[~valid] == 255) and np.all(probs[:, ~valid] == 0)
        runs.append((pred["labels"].values, probs))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


def test_margin_model_without_blending_equals_whole_image(tmp_path):
    checkpoint = save_pointwise(tmp_path / "ctx", seed=3, margin=3, blend=False)
    scene = write_test_scene(tmp_path / "scene.zarr", 75, 53, seed=7)
    pred = _predict(tmp_path, checkpoint, scene, "pred", tile=16, overlap=None, block_size=32)
    assert pred.attrs["blend"] == "none" and pred.attrs["overlap"] == 0
    np.testing.assert_allclose(pred["probs"].values, whole_image_probs(checkpoint, scene), atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="does not blend"):
        _predict(tmp_path, checkpoint, scene, "bad", tile=16, overlap=4)


def test_checkpoint_band_stats_take_precedence(tmp_path):
    stats = {"optical": ([9.0, 11.0, 10.0], [2.0, 4.0, 3.0]), "sar": ([0.5, -0.5], [1.0, 2.0])}
    band_stats_config = {name: {"mean": list(mean), "std": list(std)} for name, (mean, std) in stats.items()}
    checkpoint = save_pointwise(tmp_path / "stats", seed=1, band_stats=band_stats_config)
    scene = write_test_scene(tmp_path / "scene.zarr", 40, 50, seed=2)
    pred = _predict(tmp_path, checkpoint, scene, "pred")
    np.testing.assert_allclose(pred["probs"].values, whole_image_probs(checkpoint, scene, stats), atol=1e-6, rtol=0)
    store_stats = whole_image_probs(checkpoint, scene)
    assert np.abs(pred["probs"].values - store_stats).max() > 1e-3


def test_output_is_bitwise_identical_across_block_and_batch_sizes(tmp_path, pointwise, monkeypatch):
    scene = write_test_scene(tmp_path / "scene.zarr", 150, 130, seed=5, nodata=(slice(100, 150), slice(0, 40)))
    runs = {}
    for block, batch, probs in [(32, 2, "float32"), (64, 3, "float32"), (256, 5, "float32"), (32, 3, "uint8"), (128, 2, "uint8")]:
        # the 256 px block is also processed in slabs of 7 rows (inputs and finishing)
        monkeypatch.setattr(inference, "SLAB", 7 if block == 256 else 256)
        pred = _predict(
            tmp_path, pointwise, scene, f"{block}-{batch}-{probs}", overlap=10, block_size=block, batch_size=batch, probs=probs
        )
        runs[block, batch, probs] = (pred["labels"].values, pred["probs"].values)
    first = {}
    for (block, batch, probs), (labels, probabilities) in runs.items():
        reference = first.setdefault(probs, (labels, probabilities))
        assert np.array_equal(labels, reference[0]), (block, batch, probs)
        assert np.array_equal(probabilities, reference[1]), (block, batch, probs)
    np.testing.assert_allclose(first["uint8"][1] / 255, first["float32"][1], atol=0.5 / 255 + 1e-6)
    assert np.array_equal(first["uint8"][0], first["float32"][0])


def test_a_batch_invariant_model_runs_partial_batches_unpadded_with_the_same_output(tmp_path):
    scene = write_test_scene(tmp_path / "scene.zarr", 75, 53, seed=7)
    runs = {}
    for invariant in (False, True):  # the same network, run one tile at a time, declared batch-invariant or not
        checkpoint = save_pointwise(tmp_path / f"ckpt-{invariant}", seed=3, margin=2, blend=False, per_tile=True, batch_invariant=invariant)
        reset_calls()
        pred = _predict(tmp_path, checkpoint, scene, f"pred-{invariant}", tile=16, overlap=None, block_size=32, batch_size=3)
        runs[invariant] = (pred["labels"].values, pred["probs"].values, list(CALLS["batches"]))
    assert set(runs[False][2]) == {3}, "every batch is padded to one shape"
    assert 3 in runs[True][2] and set(runs[True][2]) - {3}, "the last batch of a block runs as it is"
    assert sum(runs[True][2]) == TileGrid(75, 53, 16, 0).num_tiles
    assert np.array_equal(runs[True][0], runs[False][0]) and np.array_equal(runs[True][1], runs[False][1])


def test_nodata_tiles_are_skipped_and_written_255(tmp_path, pointwise):
    h, w = 130, 120
    nodata = (slice(0, 100), slice(0, 120))
    scene = write_test_scene(tmp_path / "scene.zarr", h, w, seed=4, nodata=nodata)
    reset_calls()
    pred = _predict(tmp_path, pointwise, scene, "pred", tile=32, overlap=8, block_size=64, batch_size=2)
    valid = open_scene(scene)["valid"].values
    grid = TileGrid(h, w, 32, 8)
    expected = sum(
        valid[r : r + 32, c : c + 32].any() for r, c in itertools.product(grid.row_origins, grid.col_origins)
    )
    assert 0 < expected < grid.num_tiles
    assert CALLS["tiles"] == expected, "every tile with a valid pixel runs once, the others never"
    labels = pred["labels"].values
    assert np.all(labels[~valid] == 255) and np.all(labels[valid] < 4)
    assert np.all(pred["probs"].values[:, ~valid] == 0)


def test_output_grid_and_crs_equal_the_scene(tmp_path, pointwise):
    scene_path = write_test_scene(tmp_path / "scene.zarr", 70, 90)
    pred = _predict(tmp_path, pointwise, scene_path, "pred")
    scene = open_scene(scene_path)
    assert pred.rio.crs == scene.rio.crs and pred.rio.crs.to_epsg() == 32632
    assert pred.rio.transform() == scene.rio.transform()
    assert np.array_equal(pred["x"].values, scene["x"].values) and np.array_equal(pred["y"].values, scene["y"].values)
    assert pred.attrs["tilefuse_store"] == "prediction" and pred.attrs["complete"] is True
    assert pred["labels"].attrs["class_names"] == ["water", "trees", "crops", "built"]


def test_corrupt_chunk_is_named(tmp_path, pointwise):
    scene = write_test_scene(tmp_path / "scene.zarr", 150, 150, chunk=64)
    chunk = scene / "optical" / "c" / "0" / "1" / "2"
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc frame" * 10)
    with pytest.raises(InputError, match=r"chunk \(0, 1, 2\) of 'optical' .* is damaged"):
        _predict(tmp_path, pointwise, scene, "pred")
    args = ["predict", "--checkpoint", str(pointwise), "--store", str(scene), "--out", str(tmp_path / "cli.zarr")]
    assert main([*args, "--tile", "32", "--block-size", "64"]) == 2


def test_combine_adds_neighbour_strips_into_the_corner():
    own = np.ones((2, 4, 5), np.int64)
    up = np.full((2, 2, 5), 10, np.int64)
    left = np.full((2, 4, 3), 100, np.int64)
    total = combine((2, 4, 5), [own, up, left, None])
    assert total[0, 0, 0] == 111 and total[0, 3, 0] == 101 and total[0, 0, 4] == 11 and total[0, 3, 4] == 1
    assert combine((2, 4, 5), [None, None, None, None]) is None
    slabs = [combine((2, 4, 5), [own, up, left, None], slice(r, min(r + 3, 4))) for r in (0, 3)]
    assert np.array_equal(np.concatenate(slabs, axis=1), total)



def test_model_output_of_the_wrong_shape_is_an_input_error():
    from predict_fixtures import PointwiseNet

    from tilefuse.inference import TileRunner
    from tilefuse.tile_model import wrap_module

    cropping = PointwiseNet({"optical": 3, "sar": 2}, 4, margin=2)  # crops 2 px but declares margin 0
    runner = TileRunner(wrap_module(cropping, {"optical": 3, "sar": 2}, 4, margin=0))
    inputs = {"optical": np.zeros((1, 3, 16, 16), np.float32), "sar": np.zeros((1, 2, 16, 16), np.float32)}
    with pytest.raises(InputError, match=r"logits of shape \(2, 4, 12, 12\).*expected \(2, 4, 16, 16\)"):
        runner(inputs, None, 2)


def test_a_model_that_returns_no_tensor_is_an_input_error():
    from tilefuse.inference import TileRunner
    from tilefuse.tile_model import wrap_module

    class Pair(torch.nn.Module):  # e.g. (logits, aux) from a user's network
        def forward(self, inputs):
            return inputs["optical"][:, :4], inputs["sar"]

    runner = TileRunner(wrap_module(Pair(), {"optical": 4, "sar": 2}, 4))
    inputs = {"optical": np.zeros((1, 4, 16, 16), np.float32), "sar": np.zeros((1, 2, 16, 16), np.float32)}
    with pytest.raises(InputError, match=r"returned a tuple, not logits, .*expected a Tensor of shape \(2, 4, 16, 16\)"):
        runner(inputs, None, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error_not_a_complete_store_of_nodata(tmp_path, bad, monkeypatch):
    """NaN or inf logits (a diverged checkpoint) have a NaN softmax: every such pixel was written as nodata (255)
    in a store marked complete, without a word. A few bad pixels in one tile are enough to refuse the run."""
    from predict_fixtures import PointwiseNet

    scene = write_test_scene(tmp_path / "s.zarr", 40, 48, seed=3)
    checkpoint = save_pointwise(tmp_path / "ck")
    forward = PointwiseNet.forward

    def poisoned(self, inputs):  # one logit of the first tile of every batch
        logits = forward(self, inputs).clone()
        logits[0, 0, 3, 5] = bad
        return logits

    monkeypatch.setattr(PointwiseNet, "forward", poisoned)
    with pytest.raises(InputError, match=r"non-finite logits \(NaN or inf\) for block"):
        tilefuse.predict(checkpoint, scene, tmp_path / "p.zarr", tile=32, overlap=8, cluster="sync", progress=False)
    with pytest.raises(InputError, match="partial prediction"):
        tilefuse.open_prediction(tmp_path / "p.zarr")
    runner = inference.TileRunner(load_checkpoint(checkpoint)[0])
    inputs = {"optical": np.zeros((1, 3, 16, 16), np.float32), "sar": np.zeros((1, 2, 16, 16), np.float32)}
    with pytest.raises(InputError, match="non-finite logits"):
        runner(inputs, None, 2)


def test_auto_batch_size_is_bounded_and_shrinks_with_the_tile():
    from tilefuse.inference import auto_batch_size

    small, huge = auto_batch_size(64 * 64, 5), auto_batch_size(20_000 * 20_000, 5)
    assert 2 <= huge <= small <= 8 and huge == 2


def test_strips_round_trip_exactly_and_compressed():
    from tilefuse.inference import FIXED_POINT, Strip

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.random((3, 40, 300)), axis=2) / 300  # a smooth field of probabilities
    sums = (smooth * rng.random((1, 40, 300)) * FIXED_POINT).astype(np.int64)
    strip = Strip.pack(sums[:, 5:, :])
    assert np.array_equal(strip.unpack(), sums[:, 5:, :])
    assert len(strip.data) < sums[:, 5:, :].nbytes / 1.5
    assert Strip.pack(sums[:, :0]) is None


def test_windows_read_a_row_of_chunks_at_a_time_equal_one_read(tmp_path):
    """inference._read fills a window one row of chunks at a time: the same values as zarr's single read."""
    from tilefuse import storage

    path = write_test_scene(tmp_path / "s.zarr", 70, 50, chunk=16)
    group = storage.open_group(path)
    rng = np.random.default_rng(0)
    for name in ("optical", "sar", "valid"):
        array = group[name]
        for _ in range(12):
            r0, c0 = (int(v) for v in rng.integers(0, [69, 49]))
            r1, c1 = int(rng.integers(r0 + 1, 71)), int(rng.integers(c0 + 1, 51))
            region = (*([slice(None)] if array.ndim == 3 else []), slice(r0, r1), slice(c0, c1))
            got = inference._read(group, name, region, str(path))
            assert got.dtype == array.dtype and np.array_equal(got, array[region]), (name, region)
