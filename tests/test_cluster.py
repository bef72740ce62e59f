import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from predict_fixtures import build_pointwise, save_pointwise, wait_for_blocks, write_test_scene

import tilefuse
from tilefuse.cluster.client import make_client
from tilefuse.errors import InputError
from tilefuse.prediction import done_blocks, open_prediction

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"tile": 32, "overlap": 10, "block_size": 64, "batch_size": 2, "torch_threads": 1, "probs": "float32"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    scene = write_test_scene(root / "scene.zarr", 190, 170, seed=3, nodata=(slice(150, 190), slice(0, 60)))
    checkpoint = save_pointwise(root / "fast")
    slow = save_pointwise(root / "slow", delay=0.15)  # same weights, slower forward
    reference = tilefuse.predict(checkpoint, scene, root / "sync.zarr", progress=False, **SETTINGS)
    return root, scene, checkpoint, slow, reference


@pytest.fixture(scope="module")
def client():
    from tilefuse.cluster.client import close_client

    client = make_client("local:2")
    yield client
    close_client(client)


@pytest.mark.slow
def test_two_workers_give_bitwise_the_same_store_and_load_the_model_once(tmp_path, data, client):
    import predict_fixtures

    from tilefuse.cluster import plugin

    _, scene, checkpoint, _, reference = data
    builds = client.run(lambda: predict_fixtures.BUILDS["count"])
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "two.zarr", cluster=client, progress=False, **SETTINGS)
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)

    after = client.run(lambda: predict_fixtures.BUILDS["count"])
    assert len(after) == 2 and all(after[w] - builds.get(w, 0) == 1 for w in after), (builds, after)
    # the borrowed client's workers no longer hold the model (a notebook's checkpoints piled up there)
    assert client.run(lambda: sorted(plugin._RUNNERS)) == {w: [] for w in after}
    assert not [n for n in client.run(lambda dask_worker: list(dask_worker.plugins)).popitem()[1] if n.startswith("tilefuse-model")]
    # what travels with each task is small: paths, geometry, statistics; never weights
    from tilefuse.cluster.plugin import ModelSource

    source = ModelSource(str(checkpoint), "0" * 64, "test-pointwise")
    assert len(pickle.dumps(source)) < 4096


def test_a_sync_run_leaves_no_model_loaded(tmp_path, data):
    """In-process runs keep their model for the run only: a notebook predicting with one checkpoint after
    another kept every one of them (on its GPU, too)."""
    from tilefuse.cluster import plugin

    _, scene, checkpoint, _, reference = data
    other = save_pointwise(tmp_path / "other", seed=4)
    tilefuse.predict(other, scene, tmp_path / "a.zarr", progress=False, **SETTINGS)
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "b.zarr", progress=False, **SETTINGS)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)
    assert plugin._RUNNERS == {}


@pytest.mark.slow
def test_on_workers_strips_wait_on_disk_and_go_once_their_block_is_written(tmp_path, data, client, monkeypatch):
    """Workers save the lower and lower-right strips beside the store and hand on their files; the client deletes
    each once the block taking it up is written, so about one block row of them exists; the folder goes with the run."""
    from tilefuse.cluster import blocks
    from tilefuse.grid import TileGrid

    _, scene, checkpoint, _, reference = data
    alive, written = [], blocks._written

    def counting_written(bar, spill, block):
        written(bar, spill, block)
        alive.append(len(list(spill.iterdir())))

    monkeypatch.setattr(blocks, "_written", counting_written)
    pred = tilefuse.predict(checkpoint, scene, tmp_path / "two.zarr", cluster=client, progress=False, **{**SETTINGS, "block_size": 32})
    assert np.array_equal(pred["probs"].values, reference["probs"].values)
    rows, cols = TileGrid(190, 170, 32, 10, block=32).shape_in_blocks
    assert max(alive) > 0 and max(alive) <= 2 * (2 * cols - 1), alive  # of (rows - 1) * (2 * cols - 1) saved in all
    assert [p.name for p in tmp_path.iterdir()] == ["two.zarr"]


def _threads_in_task(source) -> int:
    from tilefuse.cluster.plugin import load_runner

    load_runner(source)
    return torch.get_num_threads()


def test_torch_threads_apply_in_task_threads(data, client):
    """OpenMP keeps thread counts per thread: the runner lookup must set them where tasks run."""
    _, _, checkpoint, _, _ = data
    from tilefuse.checkpoint import checkpoint_hash
    from tilefuse.cluster.plugin import ModelPlugin, ModelSource

    source = ModelSource(str(checkpoint), checkpoint_hash(checkpoint), "test-pointwise", torch_threads=2, builder=build_pointwise)
    client.register_plugin(ModelPlugin(source), name="threads-test")
    plain = ModelSource(str(checkpoint), source.checkpoint_hash, "test-pointwise", builder=build_pointwise)  # as tasks carry it
    assert client.submit(_threads_in_task, plain, pure=False).result() == 2


def test_workers_started_here_get_a_task_thread_per_block_read_ahead(client):
    from tilefuse.cluster.blocks import task_threads
    from tilefuse.cluster.client import close_client

    # CPU workers read ahead only with cores torch leaves free: the fixture's local:2 takes them all
    default = task_threads(None, cores=max(1, (os.cpu_count() or 1) // 2), device="cpu")
    assert set(client.nthreads().values()) == {default} == {1}
    deep = make_client("local:1", prefetch=2)
    try:
        assert list(deep.nthreads().values()) == [3]
    finally:
        close_client(deep)


@pytest.mark.slow
def test_a_killed_worker_loses_nothing(tmp_path, data, client):
    _, scene, _, slow, reference = data
    out = tmp_path / "killed.zarr"
    pids = list(client.run(os.getpid).values())
    killed = {}

    def kill_after_first_blocks():
        done = wait_for_blocks(out, 2, timeout=60)
        if done is not None:
            killed["done"], killed["total"] = int(done.sum()), done.size
            os.kill(pids[0], signal.SIGKILL)

    watcher = threading.Thread(target=kill_after_first_blocks)
    watcher.start()
    pred = tilefuse.predict(slow, scene, out, cluster=client, progress=False, **SETTINGS)
    watcher.join()
    assert killed and killed["done"] < killed["total"], "the worker must die mid-run"
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)
    assert done_blocks(out).all()


def _collect_worker_errors(action: str):
    import logging

    logger = logging.getLogger("distributed.worker")
    if action == "start":
        handler = logging.Handler(logging.ERROR)
        handler.records = []
        handler.emit = lambda record: handler.records.append(record.getMessage().splitlines()[0] + " " + str(record.args[3] if len(record.args or ()) > 3 else ""))
        handler._tilefuse_test = True
        logger.addHandler(handler)
        return []
    handler = next(h for h in logger.handlers if getattr(h, "_tilefuse_test", False))
    logger.removeHandler(handler)
    return handler.records


def test_a_damaged_input_on_workers_is_one_line_without_worker_tracebacks(tmp_path, data, client):
    """Workers started here share the client's stderr: each try of a task failing on a damaged chunk logged
    'Compute Failed' and its traceback there (56 lines around the one-line error of tilefuse predict --cluster local:2)."""
    import shutil

    from tilefuse.storage import chunk_key

    _, scene, checkpoint, _ = data[:4]
    damaged = tmp_path / "scene.zarr"
    shutil.copytree(scene, damaged)
    key = damaged / chunk_key("optical", (0, 1, 1))
    key.write_bytes(key.read_bytes()[:-8] + b"garbage!")
    client.run(_collect_worker_errors, "start")
    try:
        with pytest.raises(InputError, match="'optical'"):
            tilefuse.predict(checkpoint, damaged, tmp_path / "pred.zarr", cluster=client, progress=False, **SETTINGS)
    finally:
        logged = client.run(_collect_worker_errors, "stop")
    assert not any(logged.values()), logged


def test_cluster_specs_fail_with_one_clear_line(tmp_path):
    with pytest.raises(InputError, match="unknown cluster spec"):
        make_client("yarn://somewhere")
    for spec in ("local:0", "local:-1", "local:x", f"local:{4 * (os.cpu_count() or 1) + 1}", "local:99999"):
        with pytest.raises(InputError, match="local:N"):  # a huge N started processes until the machine gave up
            make_client(spec)
    with pytest.raises(InputError, match="dask-cuda|no GPU"):
        make_client("cuda")
    with pytest.raises(InputError, match="cannot connect to tcp://127.0.0.1:9"):
        make_client("tcp://127.0.0.1:9", timeout="1s")
    with pytest.raises(InputError, match="does not exist"):
        make_client(str(tmp_path / "scheduler.json"))
    # a scheduler file that outlived its scheduler names the file, not only an address the user never typed
    stale = tmp_path / "stale.json"
    stale.write_text('{"address": "tcp://127.0.0.1:9"}')
    with pytest.raises(InputError, match=rf"^cannot connect to the scheduler of {stale} at tcp://127.0.0.1:9 \(.*\): the file names a scheduler that does not answer: start the scheduler again"):
        make_client(str(stale), timeout="1s")
    for text, problem in (("", "not JSON"), ("{", "not JSON"), ("[1]", "no \"address\""), ('{"address": 5}', "no \"address\"")):
        stale.write_text(text)
        with pytest.raises(InputError, match=problem):
            make_client(str(stale), timeout="1s")
    assert make_client("sync") is None


def test_cluster_specs_as_a_user_types_them(tmp_path, monkeypatch):
    """A scheduler file under ~ (--cluster=~/scheduler.json, or from Python) was looked up in a folder named '~';
    TCP:// and an address copied with a trailing slash were an unknown spec / 'no valid port'; HOST:PORT got no
    hint of its scheme; local:² was a ValueError traceback."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "scheduler.json").write_text('{"address": "tcp://127.0.0.1:9"}')
    with pytest.raises(InputError, match=rf"^cannot connect to the scheduler of {tmp_path}/scheduler\.json at tcp://127\.0\.0\.1:9 "):
        make_client("~/scheduler.json", timeout="1s")
    for spec in ("TCP://127.0.0.1:9", "tcp://127.0.0.1:9/", " Tcp://127.0.0.1:9// "):
        with pytest.raises(InputError, match=r"^cannot connect to tcp://127\.0\.0\.1:9 \("):
            make_client(spec, timeout="1s")
    with pytest.raises(InputError, match=r"unknown cluster spec '127\.0\.0\.1:8786' \(a scheduler's address is written tcp://127\.0\.0\.1:8786\)"):
        make_client("127.0.0.1:8786")
    for spec in ("local:²", "local:٣", "local:1e1"):
        with pytest.raises(InputError, match="write local:N"):
            make_client(spec)


def test_workers_started_here_run_the_users_preloads_and_ignore_a_terminals_ctrl_c(tmp_path):
    """tilefuse's own preload (SIGINT ignored: the client handles Ctrl-C) replaced the preloads the user set in
    dask's config (distributed.worker.preload)."""
    import dask
    import distributed  # noqa: F401  (its config defaults first)

    from tilefuse.cluster.client import close_client

    preload = tmp_path / "user_preload.py"
    preload.write_text("def dask_setup(worker):\n    worker.user_preloaded = True\n")
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        client = make_client("local:1")
    try:
        seen = client.run(lambda dask_worker: (getattr(dask_worker, "user_preloaded", False), signal.getsignal(signal.SIGINT) == signal.SIG_IGN))
        assert list(seen.values()) == [(True, True)]
    finally:
        close_client(client)


@pytest.mark.slow
def test_external_cluster_example(tmp_path, data):
    """examples/external_cluster.py: dask scheduler + workers started by hand, predict against the scheduler file."""
    work = tmp_path / "external"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "external_cluster.py"), str(work), "--size", "160", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pred = open_prediction(work / "prediction.zarr")
    assert pred.attrs["complete"] and pred.attrs["model"] == "pad"
    assert (work / "prediction.tif").is_file()
    # the same checkpoint in this process, same threads per worker: bitwise the same labels
    local = tilefuse.predict(
        work / "pad-random", work / "scene.zarr", tmp_path / "local.zarr", tile=64, overlap=16, block_size=128,
        batch_size=4, torch_threads=1, progress=False,
    )  # fmt: skip
    assert np.array_equal(pred["labels"].values, local["labels"].values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_prediction_agrees_with_the_cpu(tmp_path, data):
    _, scene, checkpoint, _, reference = data
    gpu = tilefuse.predict(checkpoint, scene, tmp_path / "gpu.zarr", device="cuda", progress=False, **SETTINGS)
    np.testing.assert_allclose(gpu["probs"].values, reference["probs"].values, atol=1e-4)
    again = tilefuse.predict(checkpoint, scene, tmp_path / "again.zarr", device="cuda", progress=False, **{**SETTINGS, "block_size": 128})
    assert np.array_equal(again["probs"].values, gpu["probs"].values), "bitwise across block sizes on the GPU too"
    bf16 = tilefuse.predict(checkpoint, scene, tmp_path / "bf16.zarr", device="cuda", precision="bf16", progress=False, **SETTINGS)
    valid = reference["labels"].values != 255
    assert (bf16["labels"].values == reference["labels"].values)[valid].mean() > 0.95


@pytest.mark.slow
def test_workers_spawned_here_run_without_malloc_trim_and_others_are_never_restarted(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ halves torch's CPU speed: our clusters never set it; a cluster we did
    not start keeps its workers (a restart dropped other clients' state and broke a second run mid-setup). Dask's
    nannies leave the variable in the environment of the process that started them, so a notebook's own cluster
    made the workers tilefuse started next inherit it (and be reported as a borrowed cluster's)."""
    from distributed import Client

    from tilefuse.cluster.client import close_client
    from tilefuse.cluster.malloc import MALLOC_TRIM, _has_malloc_trim, malloc_trim_workers

    monkeypatch.delenv(MALLOC_TRIM, raising=False)  # and what dask leaves there is undone after the test

    def check_ours() -> None:
        ours = make_client("local:1")
        try:
            assert not any(ours.run(_has_malloc_trim).values()) and malloc_trim_workers(ours) == 0
            assert set(ours.run(os.environ.get, "MALLOC_ARENA_MAX").values()) == {"1"}  # tilefuse.cluster.malloc
        finally:
            close_client(ours)

    check_ours()
    with Client(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as theirs:
        pids = theirs.run(os.getpid)
        assert malloc_trim_workers(theirs) == 1
        assert theirs.run(os.getpid) == pids and all(theirs.run(_has_malloc_trim).values())
    left = os.environ.get(MALLOC_TRIM)
    assert left is not None  # dask's nanny wrote it into this process's environment
    check_ours()
    assert os.environ.get(MALLOC_TRIM) == left  # given back as it was


def test_one_malloc_arena_unless_the_user_chose(monkeypatch):
    """Workers tilefuse spawns get MALLOC_ARENA_MAX=1 and blocks run with one arena; a value the user set wins."""
    import ctypes.util

    import dask

    from tilefuse.cluster.malloc import MALLOC_ARENAS, single_arena, spawn_environ

    monkeypatch.delenv(MALLOC_ARENAS, raising=False)
    with spawn_environ():
        assert dask.config.get("distributed.nanny.pre-spawn-environ")[MALLOC_ARENAS] == 1
    assert single_arena() is (ctypes.util.find_library("c") is not None)
    monkeypatch.setenv(MALLOC_ARENAS, "4")
    with spawn_environ():
        assert MALLOC_ARENAS not in dask.config.get("distributed.nanny.pre-spawn-environ")
    assert single_arena() is False


@pytest.mark.parametrize("cluster", [123, 1.5, ["local:2"], {"local": 2}, object()])
def test_a_cluster_that_is_neither_a_spec_nor_a_client_is_one_line(tmp_path, data, cluster):
    """cluster=123 (or a list, or a LocalCluster's stand-in) was an AttributeError traceback: 'scheduler_info'."""
    _, scene, checkpoint, _, _ = data
    out = tmp_path / "pred.zarr"
    with pytest.raises(InputError, match=r"^cluster= is \w+, neither a spec .* nor a distributed\.Client"):
        tilefuse.predict(checkpoint, scene, out, tile=32, cluster=cluster, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
