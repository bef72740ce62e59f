"""The engine's pipeline: read-ahead, device-side finishing, reader failures, runner options."""

import itertools
import os
import threading

import numpy as np
import pytest
import torch
from predict_fixtures import MODALITIES, build_pointwise, save_pointwise, write_test_scene

import tilefuse
from tilefuse import inference
from tilefuse.cluster import blocks
from tilefuse.errors import InputError
from tilefuse.grid import Block, TileGrid

SETTINGS = {"tile": 32, "overlap": 10, "block_size": 64, "batch_size": 3, "torch_threads": 1, "probs": "float32", "progress": False}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    scene = write_test_scene(root / "scene.zarr", 170, 150, seed=11, nodata=(slice(120, 170), slice(0, 50)))
    checkpoint = save_pointwise(root / "ckpt", seed=2)
    return root, scene, checkpoint


def _forcing(function, **settings):
    """``function`` called with ``settings`` overriding whatever its caller passes."""
    return lambda *args, **kwargs: function(*args, **{**kwargs, **settings})


def _predict_with(monkeypatch, path, scene, checkpoint, **engine):
    """A prediction whose run_blocks call gets ``engine`` settings (prefetch=, reader_threads=)."""
    monkeypatch.setattr(blocks, "run_blocks", _forcing(blocks.run_blocks, **engine))
    try:
        return tilefuse.predict(checkpoint, scene, path, **SETTINGS)
    finally:
        monkeypatch.undo()


def test_prefetch_and_reader_threads_do_not_change_a_bit(tmp_path, data, monkeypatch):
    _, scene, checkpoint = data
    runs = {}
    for prefetch, readers in [(0, None), (1, 1), (3, 1), (3, 3), (8, 2)]:
        pred = _predict_with(monkeypatch, tmp_path / f"p{prefetch}-{readers}.zarr", scene, checkpoint, prefetch=prefetch, reader_threads=readers)
        runs[prefetch, readers] = (pred["labels"].values, pred["probs"].values)
    (labels, probs), *others = runs.values()
    assert (labels == 255).any() and (labels < 4).any()
    for key, (other_labels, other_probs) in zip(list(runs)[1:], others):
        assert np.array_equal(other_labels, labels), key
        assert np.array_equal(other_probs, probs), key


def test_reads_run_ahead_of_the_model_and_stay_bounded(tmp_path, data, monkeypatch):
    """While the model runs block n, blocks n+1..n+prefetch are read; never more inputs are held than that."""
    _, scene, checkpoint = data
    prefetch = 2
    lock = threading.Condition()
    started, held, peak = [], [0], [0]
    read, run = blocks.read_block, blocks.run_block

    def counting_read(job, block, pin=False):
        with lock:
            started.append(block)
            lock.notify_all()
        inputs = read(job, block, pin)
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        return inputs

    def waiting_run(job, inputs, runner):
        with lock:
            position = started.index(inputs.block)
            # the next `prefetch` reads start while this block is on the device (else this would time out)
            ahead = lock.wait_for(lambda: len(started) >= min(position + 1 + prefetch, total[0]), timeout=20)
            held[0] -= 1
        assert ahead, f"reads did not run ahead of block {inputs.block}"
        return run(job, inputs, runner)

    total = [0]
    real_plan = blocks.plan

    def counting_plan(*args):
        steps = real_plan(*args)
        total[0] = len(steps)
        return steps

    monkeypatch.setattr(blocks, "read_block", counting_read)
    monkeypatch.setattr(blocks, "run_block", waiting_run)
    monkeypatch.setattr(blocks, "plan", counting_plan)
    monkeypatch.setattr(blocks, "run_blocks", _forcing(blocks.run_blocks, prefetch=prefetch, reader_threads=2))
    tilefuse.predict(checkpoint, scene, tmp_path / "ahead.zarr", **SETTINGS)
    assert total[0] > prefetch + 1 and len(started) == total[0]
    assert peak[0] <= prefetch + 1, "memory is bounded by the prefetch depth"


def _damage_a_later_block(scene):
    """Overwrite the optical chunk of rows/cols 128: (read by the blocks of rows 1 and 2, not the first ones) with junk."""
    path = scene / "optical" / "c" / "0" / "2" / "2"
    assert path.is_file()
    path.write_bytes(b"junk" * 40)
    return r"chunk \(0, 2, 2\) of 'optical'"


def test_a_reader_thread_that_fails_names_the_chunk_and_stops_the_run(tmp_path, data, monkeypatch):
    root, _, checkpoint = data
    scene = write_test_scene(tmp_path / "damaged.zarr", 170, 150, seed=11)
    named = _damage_a_later_block(scene)
    with pytest.raises(InputError, match=named):
        _predict_with(monkeypatch, tmp_path / "pred.zarr", scene, checkpoint, prefetch=3, reader_threads=2)
    assert not [t for t in threading.enumerate() if t.name.startswith(("tilefuse-read", "tilefuse-write"))], "no reader or writer outlives the run"


@pytest.fixture(scope="module")
def threaded_client():
    """One in-process dask worker with two task threads: one reads ahead while the other computes."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_on_a_worker_a_failed_read_is_retried_and_a_lasting_one_names_the_chunk(tmp_path, data, threaded_client, monkeypatch):
    _, scene, checkpoint = data
    reference = tilefuse.predict(checkpoint, scene, tmp_path / "sync.zarr", **SETTINGS)
    failures = {"left": 1}
    real_read = inference._read

    def flaky_read(group, name, region, where):
        if name == "optical" and region[1].start > 0 and failures["left"]:  # a block below the first row
            failures["left"] -= 1
            raise InputError(f"{where}: chunk (0, 1, 1) of 'optical' (rows 64:128, cols 64:128) is damaged")
        return real_read(group, name, region, where)

    monkeypatch.setattr(inference, "_read", flaky_read)
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "retried.zarr", cluster=threaded_client, **SETTINGS)
    assert failures["left"] == 0, "the read failed once"
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)

    failures["left"] = 10**6
    with pytest.raises(InputError, match=r"chunk \(0, 1, 1\) of 'optical'"):
        tilefuse.predict(checkpoint, scene, tmp_path / "failed.zarr", cluster=threaded_client, **SETTINGS)


@pytest.mark.parametrize(
    "height, width, tile, overlap, block", [(170, 150, 32, 10, 64), (97, 131, 16, 5, 16), (300, 40, 64, 30, 96), (50, 50, 40, 0, 40)]
)
def test_incoming_bands_are_exactly_where_other_blocks_tiles_land(height, width, tile, overlap, block):
    """Outside a block's top and left bands only its own tiles land, so it is finished where it was computed."""
    grid = TileGrid(height, width, tile, overlap, 0, block)
    owner = np.full((height, width), -1)
    touched_by_others = np.zeros((height, width), bool)
    for index, b in enumerate(grid.blocks()):
        rows, cols = grid.block_region(b)
        owner[rows, cols] = index
    for index, b in enumerate(grid.blocks()):
        row_origins, col_origins = grid.block_tiles(b)
        for r, c in itertools.product(row_origins, col_origins):
            area = owner[r : r + tile, c : c + tile]
            touched_by_others[r : r + tile, c : c + tile] |= area != index
    for b in grid.blocks():
        rows, cols = grid.block_region(b)
        in_h, in_w = inference.incoming(grid, b)
        band = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
        band[:in_h] = True
        band[:, :in_w] = True
        assert np.array_equal(band, touched_by_others[rows, cols]), (b, in_h, in_w)


def test_block_outputs_are_one_function_of_the_totals_wherever_computed():
    rng = np.random.default_rng(0)
    total = rng.integers(0, 2**40, size=(5, 33, 17), dtype=np.int64)
    total[:, :3] = total[:1, :3]  # ties: the first class wins
    total[:, 5, :4] = 0  # nothing landed
    valid = rng.random((33, 17)) > 0.1
    for probs in (None, "uint8", "float16", "float32"):
        labels, out = inference.block_outputs(torch.from_numpy(total), torch.from_numpy(valid), 5, probs)
        covered = valid & (total.sum(0) > 0)
        expected = np.where(covered, total.argmax(0), 255)
        assert np.array_equal(labels.numpy(), expected) and labels.dtype == torch.uint8
        if probs is None:
            assert out is None
            continue
        p = np.divide(total, total.sum(0), out=np.zeros(total.shape), where=covered)
        if probs == "uint8":
            assert np.array_equal(out.numpy(), np.rint(p * 255).astype(np.uint8))
        else:
            assert np.array_equal(out.numpy(), p.astype(np.float32).astype(probs))
        # in slabs (as on the device) the same bits
        pieces = [inference.block_outputs(torch.from_numpy(total[:, s : s + 7]), torch.from_numpy(valid[s : s + 7]), 5, probs)[1] for s in range(0, 33, 7)]
        assert torch.equal(torch.cat(pieces, dim=1), out)


@pytest.mark.parametrize("classes", [1, 2, 7, 9, 200])
def test_first_max_is_max_over_classes_with_the_first_of_equal_maxima(classes):
    rng = np.random.default_rng(classes)
    total = rng.integers(0, 4, size=(classes, 41, 23)) * 2**40  # many ties
    total[:, 30:] = 2**62 - rng.integers(0, 3, size=(classes, 11, 23))  # too large for a key: the plain reduction
    total[:, 5] = 0
    total = torch.from_numpy(total)
    top, labels = inference.first_max(total)
    expected = total.max(dim=0)
    assert torch.equal(top, expected.values) and labels.dtype == torch.uint8
    assert torch.equal(labels, expected.indices.to(torch.uint8))
    assert np.array_equal(labels.numpy(), total.numpy().argmax(0))


def test_channels_last_runner_agrees_and_is_deterministic():
    model = build_pointwise(MODALITIES, 4, seed=1)
    rng = np.random.default_rng(1)
    inputs = {name: rng.normal(size=(3, bands, 16, 16)).astype(np.float32) for name, bands in MODALITIES.items()}
    plain = inference.TileRunner(model)(inputs, None, 4)
    nhwc = inference.TileRunner(model, channels_last=True)
    first = nhwc(inputs, None, 4)
    assert np.array_equal(first, nhwc(inputs, None, 4))
    assert np.abs(first - plain).max() <= 2**40 * 1e-5
    assert nhwc.buffer("optical", (4, 3, 16, 16)).is_contiguous(memory_format=torch.channels_last)


def test_engine_settings_are_checked():
    job = inference.BlockJob("s", "p", TileGrid(10, 10, 4), ("optical",), ((0.0,),), ((1.0,),), 2, 2)
    for bad in ({"prefetch": -1}, {"reader_threads": 0}, {"prefetch": 1.5}, {"window": True}):
        with pytest.raises(InputError, match=f"{next(iter(bad))}="):
            blocks.run_blocks(job, None, [], [], progress=False, **bad)
    assert blocks.task_threads(0) == 1 and blocks.task_threads(2) == 3
    assert blocks.task_threads(0, device="cuda") == 1 and blocks.task_threads(2, cores=2, device="cpu") == 3  # explicit wins


@pytest.mark.parametrize("cores", [1, 2, 8, 16, 64])
def test_cpu_workers_read_ahead_only_with_cores_torch_leaves_free(cores):
    from tilefuse.cluster.client import _task_threads

    # a worker's torch threads take its whole share of the cores: no reader thread competes with them
    assert blocks.task_threads(None, cores=cores, device="cpu") == 1
    assert _task_threads(None, 2, "cpu") == 1
    # a GPU worker reads one block ahead per four cores (at least one)
    assert blocks.task_threads(None, cores=cores, device="cuda") == 1 + max(1, min(blocks.MAX_PREFETCH, cores // 4))
    # torch on part of the cores: the rest read ahead
    assert blocks.default_prefetch(cores, "cpu", torch_threads=max(1, cores // 2)) == min(
        max(1, min(blocks.MAX_PREFETCH, cores // 4)), cores - max(1, cores // 2)
    )
    assert 1 <= blocks.default_prefetch(2) <= blocks.default_prefetch(64) <= blocks.MAX_PREFETCH


@pytest.mark.parametrize("tile, overlap, rows, cols", [(8, 3, 3, 4), (8, 0, 2, 3), (9, 6, 4, 3), (5, 4, 3, 3)])
def test_accumulating_fresh_regions_by_assignment_gives_the_sums_of_zero_fill_and_add(tile, overlap, rows, cols):
    """Every tile of a block in row-major order: assigning what no earlier tile reached equals adding into zeros."""
    rng = np.random.default_rng(tile * 100 + overlap)
    stride, margin = tile - overlap, 2
    shape = (3, margin + (rows - 1) * stride + tile, margin + (cols - 1) * stride + tile)
    scaled = torch.from_numpy((rng.random((rows, cols, 3, tile, tile)) * 2**40).astype(np.float32))
    expected = np.zeros(shape, np.int64)
    acc = torch.full(shape, -(2**62), dtype=torch.int64)  # garbage where nothing is assigned or zeroed
    acc[:, :margin] = 0
    acc[:, margin:, :margin] = 0
    for i in range(rows):
        for j in range(cols):
            y, x = margin + i * stride, margin + j * stride
            expected[:, y : y + tile, x : x + tile] += scaled[i, j].numpy().astype(np.int64)
            inference.accumulate(acc[:, y:, x:], scaled[i, j], overlap * (i > 0), overlap * (j > 0), fresh=True)
    assert np.array_equal(acc.numpy(), expected)
    zeroed = torch.zeros(shape, dtype=torch.int64)
    for i, j in itertools.product(range(rows), range(cols)):
        inference.accumulate(zeroed[:, margin + i * stride :, margin + j * stride :], scaled[i, j], 0, 0, fresh=False)
    assert np.array_equal(zeroed.numpy(), expected)


def test_strips_that_wait_a_block_row_wait_on_disk_and_go_once_taken_up(tmp_path, data, monkeypatch):
    """Lower and lower-right strips are handed on as files beside the store, each deleted once the block that
    takes it up is written, so at most about one block row of them exists; the folder goes with the run."""
    _, scene, checkpoint = data
    out = tmp_path / "p.zarr"
    saved, alive = [], []
    save, written = inference.Strip.save, blocks._written

    def recording_save(strip, path):
        saved.append(path)
        return save(strip, path)

    def counting_written(bar, spill, block):
        written(bar, spill, block)
        alive.append(len(list(spill.iterdir())))

    monkeypatch.setattr(inference.Strip, "save", recording_save)
    monkeypatch.setattr(blocks, "_written", counting_written)
    pred = tilefuse.predict(checkpoint, scene, out, **{**SETTINGS, "block_size": 32})
    monkeypatch.undo()
    reference = tilefuse.predict(checkpoint, scene, tmp_path / "q.zarr", **{**SETTINGS, "block_size": 256})  # one block: no strips
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)
    rows, cols = TileGrid(170, 150, tile=32, overlap=10, block=32).shape_in_blocks
    row_of_strips = cols + cols - 1
    assert len(saved) == (rows - 1) * row_of_strips > 2 * row_of_strips, "every lower and lower-right strip went to disk"
    assert max(alive) <= 2 * row_of_strips, "strips of more than about one block row were kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.zarr.")], "the spill folder outlived the run"


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_a_damaged_spilled_strip_is_an_error_never_sums(tmp_path, damage):
    from tilefuse.inference import Strip

    sums = np.arange(3 * 8 * 40, dtype=np.int64).reshape(3, 8, 40) << 30
    handle = Strip.pack(sums).save(tmp_path / "0-0-down")
    assert np.array_equal(handle.unpack(), sums)
    path = tmp_path / "0-0-down"
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:-7])
    else:
        path.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])
    with pytest.raises(InputError, match=f"spill strip {path}.*(missing|damaged).*--resume"):
        handle.unpack()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if damage == "missing" else ["0-0-down"]), "no partial files left"


def test_a_strip_saved_after_its_run_removed_the_spill_folder_is_quiet_bad_input(tmp_path):
    """A worker still computing a piece of a run that failed elsewhere finds the spill folder removed: an InputError
    (which workers do not log with a traceback, tilefuse.cluster.plugin), not a FileNotFoundError "Compute Failed"
    on the user's stderr (seen once in a fresh-clone CI run of test_cluster.py)."""
    import logging

    from tilefuse.cluster.plugin import _ExpectedFailures
    from tilefuse.inference import Strip

    strip = Strip.pack(np.ones((2, 4, 8), np.int64))
    with pytest.raises(InputError, match=f"spill folder {tmp_path / 'gone'} is gone.*--resume") as caught:
        strip.save(tmp_path / "gone" / "0-0-down")
    assert list(tmp_path.iterdir()) == []
    report = logging.LogRecord("distributed.worker", logging.ERROR, "", 0, "Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %s",
                               ("tilefuse-down-1a2b3c4d-0-0", "executing", "_piece", repr(caught.value)), None)  # fmt: skip
    assert not _ExpectedFailures().filter(report)


def test_a_killed_runs_spill_folder_is_removed_by_the_next_run(tmp_path, data):
    import subprocess
    import sys

    from tilefuse.outputs import temporary_sibling

    _, scene, checkpoint = data
    out = tmp_path / "p.zarr"
    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    mine = temporary_sibling(out)
    dead = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid.pid}-"))
    dead.mkdir()
    (dead / "0-0-down").write_bytes(b"left by a killed run")
    tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    assert not dead.exists()


def test_a_full_disk_while_strips_wait_is_one_line_and_the_store_resumes(tmp_path, data, monkeypatch):
    import errno

    _, scene, checkpoint = data
    out = tmp_path / "p.zarr"
    save = inference.Strip.save

    def full(strip, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(inference.Strip, "save", full)
    with pytest.raises(InputError, match="No space left on device"):
        tilefuse.predict(checkpoint, scene, out, **SETTINGS)
    assert [p.name for p in tmp_path.iterdir()] == ["p.zarr"], "no spill folder, lock or temporary left"
    monkeypatch.setattr(inference.Strip, "save", save)
    resumed = tilefuse.predict(checkpoint, scene, out, **{**SETTINGS, "resume": True})
    whole = tilefuse.predict(checkpoint, scene, tmp_path / "q.zarr", **SETTINGS)
    assert np.array_equal(resumed["probs"].values, whole["probs"].values)
