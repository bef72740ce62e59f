"""A borrowed cluster: ``dask scheduler`` + ``dask worker`` processes the user started, shared with other work.

tilefuse must never restart or shut down such a cluster, nor touch what other clients hold there; two
predictions at once on it give what ``sync`` gives, bit for bit.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from predict_fixtures import save_pointwise, wait_for_blocks, write_test_scene

import tilefuse
from tilefuse.errors import InputError
from tilefuse.prediction import done_blocks, open_prediction

TESTS = Path(__file__).resolve().parent
SETTINGS = {"tile": 32, "overlap": 10, "block_size": 64, "batch_size": 2, "torch_threads": 1, "probs": "float32"}


def _start(command, env, cwd=None) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


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
def test_a_scheduler_that_dies_mid_run_is_one_line_and_the_store_resumes_bitwise(tmp_path, data, borrowed, capfd):
    """The client's futures were cancelled ('scheduler-connection-lost') and predict ended in distributed's
    FutureCancelledError / CommClosedError traceback, exit 1. Then the client's own reports still came before the
    line: a CommClosedError traceback, and "Failed to reconnect to scheduler after 10.00 seconds" (after 2 s)."""
    scene, _, slow, reference = data
    scheduler_file, processes = borrowed
    out = tmp_path / "lost.zarr"
    killed = {}

    def kill_after_first_blocks():
        done = wait_for_blocks(out, 1, timeout=120)
        if done is not None:
            killed["done"] = int(done.sum())
            os.killpg(processes[0].pid, signal.SIGKILL)

    watcher = threading.Thread(target=kill_after_first_blocks)
    watcher.start()
    settings = {**SETTINGS, "block_size": 32}
    with pytest.raises(InputError, match=r"^lost the connection to .*scheduler\.json mid-run .*rerun with resume=True \(--resume\)") as error:
        tilefuse.predict(slow, scene, out, cluster=str(scheduler_file), progress=False, **settings)
    watcher.join()
    assert killed and "\n" not in str(error.value)
    said = capfd.readouterr().err
    assert "distributed.client" not in said and "Traceback" not in said, said
    assert not done_blocks(out).all()
    _same(tilefuse.predict(slow, scene, out, resume=True, progress=False, **settings), reference)


@pytest.mark.slow
def test_a_cluster_left_without_workers_says_so_and_finishes_once_one_joins(tmp_path, data, borrowed, monkeypatch, capfd):
    """Every worker killed mid-run: the tasks wait for workers and the run looked hung for ever, without a word."""
    from tilefuse.cluster import blocks

    monkeypatch.setattr(blocks, "NO_WORKERS_NOTICE_S", 1.0)
    scene, _, slow, reference = data
    scheduler_file, processes = borrowed
    out = tmp_path / "orphan.zarr"
    events = {}

    def kill_then_start_one():
        deadline = time.monotonic() + 120
        done = wait_for_blocks(out, 1, timeout=120)
        if done is not None:
            for process in processes[1:]:
                os.killpg(process.pid, signal.SIGKILL)
            events["killed"] = int(done.sum())
        while "no worker" not in events.get("err", "") and time.monotonic() < deadline:
            time.sleep(0.2)
            events["err"] = events.get("err", "") + capfd.readouterr().err
        env = {**os.environ, "PYTHONPATH": str(TESTS)}
        processes.append(_start([sys.executable, "-m", "dask", "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                                 "--nthreads", "1", "--memory-limit", "2GB"], env))  # fmt: skip

    watcher = threading.Thread(target=kill_then_start_one)
    watcher.start()
    settings = {**SETTINGS, "block_size": 32}
    pred = tilefuse.predict(slow, scene, out, cluster=str(scheduler_file), progress=False, **settings)
    watcher.join()
    assert events.get("killed") and "has had no worker for" in events["err"] and "--resume" in events["err"]
    _same(pred, reference)


@pytest.mark.slow
def test_workers_without_tilefuse_or_with_another_version_are_one_line(tmp_path, data, borrowed, monkeypatch):
    """Workers whose environment lacks tilefuse ended in distributed's 'ModuleNotFoundError' traceback; workers
    of another version ran the blocks with other code than the store records."""
    from distributed import Client

    from tilefuse.cluster import run

    scene, checkpoint, _, _ = data
    scheduler_file, processes = borrowed
    monkeypatch.setattr(run, "_version", lambda: "9.9.9")
    with pytest.raises(InputError, match=r"^the workers of .*scheduler\.json run tilefuse .*, this process 9\.9\.9: install the same version"):
        tilefuse.predict(checkpoint, scene, tmp_path / "v.zarr", cluster=str(scheduler_file), progress=False, **SETTINGS)
    monkeypatch.undo()
    with Client(scheduler_file=str(scheduler_file), timeout="30s") as user:
        killed = set(user.scheduler_info(n_workers=-1)["workers"])
    for process in processes[1:]:
        os.killpg(process.pid, signal.SIGKILL)
    stub = tmp_path / "stub" / "tilefuse"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tilefuse'\", name='tilefuse')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(TESTS)])}
    processes.append(_start([sys.executable, "-m", "dask", "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                             "--nthreads", "1", "--memory-limit", "2GB"], env, cwd=tmp_path))  # fmt: skip (not in the checkout)
    with Client(scheduler_file=str(scheduler_file), timeout="30s") as user:
        deadline = time.monotonic() + 60
        while True:  # the new worker alone: the scheduler may list a killed one for a moment after the kill
            workers = set(user.scheduler_info(n_workers=-1)["workers"])
            if len(workers) == 1 and not workers & killed:
                break
            assert time.monotonic() < deadline, workers
            time.sleep(0.2)
    with pytest.raises(InputError, match=r"^the workers of .*scheduler\.json cannot import tilefuse \(.*\): install tilefuse \S+ in the workers' environment$"):
        tilefuse.predict(checkpoint, scene, tmp_path / "m.zarr", cluster=str(scheduler_file), progress=False, **SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler.json", "stub"]  # nothing written


@pytest.mark.slow
def test_a_run_on_one_client_outlives_another_client_of_the_process(tmp_path, data, borrowed):
    """The run tracked its blocks on the default client's event loop: with two clients in one process (a
    notebook's, two predictions at once) and the other one made last and closed first, the run's last blocks
    were done on the cluster and never collected: predict hung for ever."""
    from distributed import Client

    scene, _, slow, reference = data
    scheduler_file, _ = borrowed
    out, result = tmp_path / "mine.zarr", {}
    with Client(scheduler_file=str(scheduler_file), timeout="30s") as mine:
        other = Client(scheduler_file=str(scheduler_file), timeout="30s", set_as_default=True)  # the default now

        def run():
            result["pred"] = tilefuse.predict(slow, scene, out, cluster=mine, progress=False, **{**SETTINGS, "block_size": 32})

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for_blocks(out, 1, timeout=120)
        other.close()
        thread.join(180)
        assert not thread.is_alive(), "the run hung once the other client closed"
    _same(result["pred"], reference)


CLI = "import sys; sys.path.insert(0, %r); import predict_fixtures\nfrom tilefuse.cli import main\nif __name__ == '__main__': sys.exit(main(sys.argv[1:]))"


def _cli(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``tilefuse ARGS`` in a fresh process that knows the test models (a script, so spawned workers can import its __main__)."""
    return subprocess.run([sys.executable, "-c", CLI % str(TESTS), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}, **kwargs)  # fmt: skip


@pytest.mark.slow
def test_a_block_that_keeps_killing_its_workers_is_one_line_naming_it_and_the_store_stays_partial(tmp_path, data):
    """dask's KilledWorker (a block's task killed every worker that ran it: out of memory) was one line naming a
    task key ('tilefuse-compute-5b9cb233-0-1'), below the scheduler's own ERROR line saying the same."""
    scene = data[0]
    deadly = save_pointwise(tmp_path / "deadly", die=True)  # every forward ends its worker process at once
    out = tmp_path / "pred.zarr"
    args = ["predict", "--checkpoint", deadly, "--store", scene, "--out", out, "--tile", 32, "--block-size", 64, "--cluster", "local:1"]
    # one death is enough (dask's default gives a task three), and no notice of an empty cluster meanwhile
    result = _cli(args, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(
        rf"tilefuse: error: the workers of local:1 died running block \d,\d \(rows \d+\.\.\d+, columns \d+\.\.\d+\), one after another "
        rf"\(out of memory\? see their logs\): rerun with resume=True \(--resume\): {re.escape(str(out))} keeps the blocks written so far",
        errors[0],
    ), errors
    assert "leaked semaphore" not in result.stderr, result.stderr[-3000:]  # the killed workers' blosc lock
    assert not done_blocks(out).all()
    with pytest.raises(InputError, match="partial prediction.*--resume"):
        open_prediction(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deadly", "pred.zarr"]  # no lock, no spill folder left


@pytest.mark.slow
@pytest.mark.parametrize("sig, group, code", [(signal.SIGTERM, False, 128 + signal.SIGTERM), (signal.SIGINT, True, 130)])
def test_an_interrupted_prediction_on_local_workers_gives_back_everything_and_resumes_bitwise(tmp_path, data, sig, group, code):
    """SIGTERM (a batch system's cancel or time limit, ``kill``) ended predict at once: its lock stayed (a resume
    on another host was refused), with its spill folder; Ctrl-C (SIGINT to the terminal's whole process group)
    left dask's warnings about cancelled tasks and workers killed after 4 s around 'tilefuse: interrupted'."""
    import psutil

    scene, _, _, reference = data
    slow = save_pointwise(tmp_path / "slow", delay=0.5)
    out = tmp_path / "pred.zarr"
    args = ["predict", "--checkpoint", slow, "--store", scene, "--out", out, "--tile", 32, "--overlap", 10, "--block-size", 32,
            "--batch-size", 2, "--torch-threads", 1, "--probs", "--probs-dtype", "float32", "--cluster", "local:2"]  # fmt: skip
    cli = subprocess.Popen([sys.executable, "-c", CLI % str(TESTS), *map(str, args)], stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(TESTS)}, start_new_session=True)  # fmt: skip
    try:
        assert wait_for_blocks(out, 1, timeout=180) is not None
        workers = [p.pid for p in psutil.Process(cli.pid).children(recursive=True)]
        if group:
            os.killpg(cli.pid, sig)
        else:
            cli.send_signal(sig)
        assert cli.wait(60) == code
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
    lines = cli.stderr.read().replace("\r", "\n").splitlines()
    assert not [line for line in lines if re.search(r"WARNING|ERROR|Traceback|leaked", line)], lines
    said = ["tilefuse: interrupted"] if code == 130 else [f"tilefuse: stopped by SIGTERM: {out} keeps the blocks written so far; finish it with --resume (Python: resume=True)"]
    assert [line for line in lines if line.startswith("tilefuse: ") and "dashboard" not in line] == said
    deadline = time.monotonic() + 20
    while [pid for pid in workers if psutil.pid_exists(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and not [pid for pid in workers if psutil.pid_exists(pid)], "worker processes outlived the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.zarr", "slow"]  # no lock, no spill folder
    assert not done_blocks(out).all()
    # a resume that forgets --tile names it (it was 'block size 32 px must be at least the tile size (256 px): raise --block-size')
    with pytest.raises(InputError, match=r"was made with tile=32, not 256: resume with tile=32 \(--tile 32\)"):
        tilefuse.predict(slow, scene, out, resume=True, progress=False)
    _same(tilefuse.predict(slow, scene, out, resume=True, progress=False, **{**SETTINGS, "block_size": 32}), reference)


def test_a_closed_client_or_a_scheme_tilefuse_cannot_open_is_one_line(tmp_path, data):
    """A user's Client closed before predict (or whose cluster was closed) was a RuntimeError ('IOLoop is
    closed') or KeyError ('workers'); a tls:// scheduler (dask-jobqueue with security=), ucx:// or another
    process's inproc:// address were TypeError/ValueError tracebacks. Nothing is written either way, and a
    failed Client does not stay dask's default scheduler. In a process of its own: Clients are process-wide state."""
    scene, checkpoint, _, _ = data
    (tmp_path / "tls.json").write_text(json.dumps({"address": "tls://127.0.0.1:1"}))
    code = f"""
import dask, json, sys
sys.path.insert(0, {str(TESTS)!r})
import predict_fixtures  # registers test-pointwise
import tilefuse
from distributed import Client
settings = json.loads(sys.argv[1])
said = []
client = Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None)
client.close()
for cluster in (client, "tls://127.0.0.1:8786", {str(tmp_path / "tls.json")!r}):
    try:
        tilefuse.predict({str(checkpoint)!r}, {str(scene)!r}, {str(tmp_path / "p.zarr")!r}, cluster=cluster, connect_timeout=3, progress=False, **settings)
    except tilefuse.InputError as error:
        said.append(str(error))
print(json.dumps([said, dask.config.get("scheduler", None)]))
"""
    done = subprocess.run([sys.executable, "-c", code, json.dumps(SETTINGS)], capture_output=True, text=True, timeout=300)
    said, scheduler = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(said) == 3, (said, done.stderr[-2000:])
    assert re.match(r"the dask Client passed as cluster= cannot reach its scheduler .*pass an open Client", said[0]), said[0]
    assert all(re.match(r"cannot connect to the dask scheduler at .*make the Client yourself", line) for line in said[1:]), said
    assert scheduler is None, "a failed Client stayed dask's default scheduler"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["tls.json"], left


REWRITTEN = """import sys; sys.path.insert(0, %r); import predict_fixtures
from pathlib import Path
import tilefuse.cluster.run as run
from tilefuse.cli import main
planned = run.inspect_checkpoint
def inspect_then_retrain(path):  # a training run rewrites the checkpoint once the plan has recorded its hash
    found = planned(path)
    predict_fixtures.save_pointwise(Path(path), seed=1)
    return found
run.inspect_checkpoint = inspect_then_retrain
if __name__ == '__main__': sys.exit(main(sys.argv[1:]))"""


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["local:2", "sync", "borrowed"])
def test_a_checkpoint_rewritten_under_a_prediction_is_one_line_and_leaves_no_store(tmp_path, cluster, request):
    """A training run that rewrote the checkpoint between the plan (which records its hash) and the workers'
    model loading was refused in one line, but each worker of local:N also printed dask's 'Worker plugin ...
    failed to setup' ERROR with the InputError's traceback on the run's stderr; and the line said
    'predict again (--overwrite)' though no store was left to overwrite. ``sync`` created the store before its
    first block loaded the model, so it left one. A borrowed cluster's workers log on their own (not ours to
    silence): the run still ends in the one line."""
    scene = write_test_scene(tmp_path / "scene.zarr", 64, 64, seed=2)
    checkpoint = save_pointwise(tmp_path / "ckpt")
    out = tmp_path / "pred.zarr"
    if cluster == "borrowed":
        cluster = str(request.getfixturevalue("borrowed")[0])
    args = ["predict", "--checkpoint", checkpoint, "--store", scene, "--out", out, "--tile", 32, "--block-size", 32,
            "--batch-size", 2, "--torch-threads", 1, "--cluster", cluster]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", REWRITTEN % str(TESTS), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(TESTS)}, timeout=240)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith("tilefuse: ") for line in lines), done.stderr[-3000:]  # notes: dashboard, MALLOC_TRIM_THRESHOLD_
    assert [line for line in lines if re.search("error|traceback", line, re.I)] == [
        f"tilefuse: error: checkpoint {checkpoint} changed after this prediction started (a training run rewrote it?): "
        "predict again once it no longer changes, or from a copy of it"
    ], done.stderr[-3000:]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "scheduler.json") == ["ckpt", "scene.zarr"]
