"""A borrowed cluster: ``dask scheduler`` + ``dask worker`` processes the user started, shared with other work.

tilefuse must never restart or shut down such a cluster, nor touch what other clients hold there; two
predictions at once on it give what ``sync`` gives, bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from predict_fixtures import save_pointwise, write_test_scene

import tilefuse
from tilefuse.errors import InputError
from tilefuse.prediction import done_blocks, open_prediction

TESTS = Path(__file__).resolve().parent
SETTINGS = {"tile": 32, "overlap": 10, "block_size": 64, "batch_size": 2, "torch_threads": 1, "probs": "float32"}


def _start(command, env) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def borrowed(tmp_path):
    """A scheduler file and the processes of a cluster started by hand: two nannied workers, one thread each
    (their nannies set dask's MALLOC_TRIM_THRESHOLD_, as everywhere)."""
    from distributed import Client

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    dask = [sys.executable, "-m", "dask"]
    scheduler_file = tmp_path / "scheduler.json"
    processes = [_start([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                         "--scheduler-file", str(scheduler_file)], env)]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (scheduler_file.is_file() and scheduler_file.read_text().strip()):
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.2)
        for _ in range(2):
            processes.append(_start([*dask, "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                                     "--nthreads", "1", "--memory-limit", "2GB", "--death-timeout", "60"], env))  # fmt: skip
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        yield scheduler_file, processes
    finally:
        for process in reversed(processes):
            _end(process)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("borrowed")
    scene = write_test_scene(root / "scene.zarr", 150, 130, seed=5, nodata=(slice(120, 150), slice(0, 40)))
    checkpoint = save_pointwise(root / "ckpt")
    slow = save_pointwise(root / "slow", delay=0.15)  # same weights, slower forward
    reference = tilefuse.predict(checkpoint, scene, root / "sync.zarr", progress=False, **SETTINGS)
    return scene, checkpoint, slow, reference


def _same(pred, reference) -> None:
    assert pred.attrs["complete"]
    assert np.array_equal(pred["labels"].values, reference["labels"].values)
    assert np.array_equal(pred["probs"].values, reference["probs"].values)


@pytest.mark.slow
def test_two_predictions_at_once_on_a_borrowed_cluster_leave_it_and_its_data_as_they_were(tmp_path, data, borrowed):
    """The first of two predictions restarted the workers (dask's MALLOC_TRIM_THRESHOLD_ slows torch), and the
    second, registering its model meanwhile, ended in a CommClosedError traceback; a cluster tilefuse did not
    start is never restarted, and what another client holds there stays."""
    from distributed import Client

    scene, checkpoint, _, reference = data
    scheduler_file, _ = borrowed
    with Client(scheduler_file=str(scheduler_file), timeout="30s") as user:
        pids = user.run(os.getpid)
        held = user.scatter(np.arange(7), broadcast=True)  # a notebook's data on its own cluster
        outs, errors = [tmp_path / "a.zarr", tmp_path / "b.zarr"], []

        def run(out):
            try:
                tilefuse.predict(checkpoint, scene, out, cluster=str(scheduler_file), progress=False, **SETTINGS)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))

        threads = [threading.Thread(target=run, args=(out,)) for out in outs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        for out in outs:
            _same(open_prediction(out), reference)
        assert user.run(os.getpid) == pids  # no worker restarted
        assert held.result(timeout=30).tolist() == list(range(7))
        assert user.run(lambda: "MALLOC_TRIM_THRESHOLD_" in os.environ) == {w: True for w in pids}  # left as they were
    # the cluster is still up after the runs
    with Client(scheduler_file=str(scheduler_file), timeout="30s") as after:
        assert len(after.scheduler_info(n_workers=-1)["workers"]) == 2


@pytest.mark.slow
def test_a_scheduler_that_dies_mid_run_is_one_line_and_the_store_resumes_bitwise(tmp_path, data, borrowed):
    """The client's futures were cancelled ('scheduler-connection-lost') and predict ended in distributed's
    FutureCancelledError / CommClosedError traceback, exit 1."""
    scene, _, slow, reference = data
    scheduler_file, processes = borrowed
    out = tmp_path / "lost.zarr"
    killed = {}

    def kill_after_first_blocks():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                done = done_blocks(out)
            except Exception:  # the store is not created yet
                time.sleep(0.05)
                continue
            if done.sum() >= 1:
                killed["done"] = int(done.sum())
                os.killpg(processes[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_blocks)
    watcher.start()
    settings = {**SETTINGS, "block_size": 32}
    with pytest.raises(InputError, match=r"^lost the connection to .*scheduler\.json mid-run .*rerun with resume=True \(--resume\)") as error:
        tilefuse.predict(slow, scene, out, cluster=str(scheduler_file), progress=False, **settings)
    watcher.join()
    assert killed and "\n" not in str(error.value)
    assert not done_blocks(out).all()
    _same(tilefuse.predict(slow, scene, out, resume=True, progress=False, **settings), reference)
