"""Data-parallel training: ranks from the environment, streams over ranks x workers, 2 gloo processes on CPU.

The process tests start jobs with :func:`tilefuse.distributed.launch_local`, which
sets torchrun's variables; each rank runs this file as a script (``python
tests/test_ddp.py JOB.json``, see :func:`_rank_main`), so the test models are
registered in every rank. Ranks other than 0 run with the run folder's writing
methods replaced by ones that fail: no rank but 0 may write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by the ranks

from test_sampling import CLASSES, _cells, _pooled_chi2, _sampler, _take, labelled_scene, write  # noqa: E402
from tilefuse import distributed  # noqa: E402
from tilefuse.signals import terminating  # noqa: E402
from tilefuse.checkpoint import ModelConfig, load_checkpoint, read_config  # noqa: E402
from tilefuse.dataset import PatchDataset, StreamState  # noqa: E402
from tilefuse.errors import InputError  # noqa: E402
from tilefuse.scene import IGNORE  # noqa: E402
from tilefuse.tile_model import TileModel, TileModelSpec, register_model  # noqa: E402
from tilefuse.training import RunDir, TrainSettings, fit  # noqa: E402

BANDS = {"optical": 3, "sar": 2}
IDENTITY = {"optical": {"mean": [0.0] * 3, "std": [1.0] * 3}, "sar": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}}
PATCH = 16


class _Net(TileModel):
    """A small segmentation net without dropout: a step depends on the batch only (no RNG)."""

    def __init__(self, modalities, num_classes):
        super().__init__()
        self.spec = TileModelSpec(dict(modalities), num_classes, margin=0, blend=True)
        self.body = nn.Sequential(nn.Conv2d(sum(modalities.values()), 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1))

    def forward(self, inputs):
        return self.body(torch.cat([inputs[n] for n in self.spec.modalities], dim=1))


@register_model("test-ddp")
def _build(modalities, num_classes, **hparams):
    return _Net(modalities, num_classes)


# ------------------------------------------------------------------ pure parts


def test_ranks_backend_and_device_follow_torchruns_environment():
    assert distributed.from_env({}) == distributed.Ranks()
    ranks = distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (ranks.rank, ranks.world, ranks.local_rank, ranks.local_world, ranks.launched, ranks.writer) == (3, 4, 1, 2, True, False)
    assert distributed.from_env({"RANK": "0", "WORLD_SIZE": "1"}).writer
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2"}):
        with pytest.raises(InputError) as error:
            distributed.from_env(bad)
        assert len(str(error.value).splitlines()) == 1 and "RANK" in str(error.value)
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.rank_device(torch.device("cuda"), ranks) == torch.device("cuda", 1)
    assert distributed.rank_device(torch.device("cpu"), ranks) == torch.device("cpu")
    assert distributed.rank_device(torch.device("cuda"), distributed.Ranks()) == torch.device("cuda")
    with pytest.raises(InputError, match="device='cuda'"):
        distributed.rank_device(torch.device("cuda", 0), ranks)
    assert distributed.rank_threads(16, ranks, env={}) == 8 and distributed.rank_threads(1, ranks, env={}) == 1
    assert distributed.rank_threads(16, ranks, env={"OMP_NUM_THREADS": "3"}) == 3  # torchrun's and launch_local's setting wins
    seeds = {distributed.rank_seed(42, r) for r in range(1, 9)}
    assert len(seeds) == 8 and distributed.rank_seed(42, 1) == distributed.rank_seed(42, 1)


def _simulate(state: StreamState, batches: int, size: int) -> list[list[tuple[int, ...]]]:
    """Batch i of each rank as (stream, position) pairs: the DataLoader takes batch i from worker i % workers."""
    position = list(state.start)
    out = [[] for _ in range(state.world)]
    for i in range(batches):
        for rank in range(state.world):
            stream = state.stream(rank, i % state.workers)
            out[rank].append(tuple((stream, position[stream] + j) for j in range(size)))
            position[stream] += size
    return out


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 2)])
def test_stream_state_gives_every_rank_and_worker_its_own_stream_and_resumes_exactly(world, workers):
    fresh = StreamState.fresh(world * workers, world)
    owners = sorted(fresh.stream(r, w) for r in range(world) for w in range(workers))
    assert owners == list(range(world * workers)), "streams are not a partition over ranks x workers"
    whole = _simulate(fresh, 15, 3)
    for k in range(15):
        once = fresh.after(k, 3)
        resumed = _simulate(once, 15 - k, 3)
        assert all(resumed[r] == whole[r][k:] for r in range(world))
        assert fresh.after(k // 2, 3).after(k - k // 2, 3) == once
        assert StreamState.from_dict(json.loads(json.dumps(once.to_dict()))) == once
    with pytest.raises(ValueError):
        StreamState(3, (0, 0, 0), 0, 2)


def test_a_state_saved_before_ranks_is_a_world_of_one():
    old = {"streams": 2, "start": [8, 4], "offset": 1}
    state = StreamState.from_dict(old)
    assert (state.world, state.workers, state.stream(0, 0)) == (1, 2, 1)
    assert state.after(3, 4) == StreamState(2, (12, 12), 0, 1)  # batches 0, 2 from stream 1, batch 1 from stream 0


def test_union_of_the_ranks_streams_is_the_one_process_law():
    """Random patches: each (rank, worker) stream, and their union, uniform over the eligible origins."""
    sampler, eligible = _sampler(k=1, per_round=1, seed=11)
    state = StreamState.fresh(4, world=2)  # 2 ranks x 2 workers
    uniform = [np.concatenate([_cells(e, 16) for e in eligible])]
    flat = [np.concatenate([_cells(np.ones(e.shape), 16) for e in eligible])]
    union = [np.zeros(e.shape, np.int64) for e in eligible]
    for rank in range(2):
        counts = [np.zeros(e.shape, np.int64) for e in eligible]
        for worker in range(2):
            for sample in _take(sampler.iter_stream(state.stream(rank, worker), state.streams), 1500):
                counts[sample.store][sample.y, sample.x] += 1
        observed = [np.concatenate([_cells(c, 16) for c in counts])]
        assert _pooled_chi2(observed, uniform) > 1e-3, f"rank {rank}"
        union = [u + c for u, c in zip(union, counts)]
    observed = [np.concatenate([_cells(c, 16) for c in union])]
    assert _pooled_chi2(observed, uniform) > 1e-3
    assert _pooled_chi2(observed, flat) < 1e-6, "the test has no power"


def test_labelled_pixels_of_the_ranks_are_one_epoch_of_the_one_process_sampler(tmp_path):
    from tilefuse.sampling import LabelledPixelSampler

    path = write(labelled_scene(96, 96, seed=2), tmp_path / "s.zarr")
    sampler = LabelledPixelSampler([path], list(BANDS), 5, 12, window=64, seed=4)
    n = len(sampler.pixels)
    one = sorted((s.store, s.y, s.x) for s in _take(sampler.iter_stream(0, 1), n))
    state = StreamState.fresh(4, world=2)
    shares = [
        [(s.store, s.y, s.x) for s in _take(sampler.iter_stream(state.stream(r, w), 4), len(range(state.stream(r, w), n, 4)))]
        for r in range(2) for w in range(2)
    ]
    assert sorted(sum(shares, [])) == one and len(set(sum(shares, []))) == n


def test_each_rank_of_the_dataset_runs_its_own_streams(tmp_path):
    sampler, _ = _sampler(k=4, per_round=2, seed=5)
    dataset = PatchDataset(sampler, IDENTITY, augment=False)
    for rank in range(2):
        got = [(i["optical"], t) for (i, t), _ in zip(dataset.for_rank(rank, 2), range(5))]
        want = _take(sampler.iter_stream(rank, 2), 5)
        assert all(torch.equal(g[0], torch.from_numpy(np.ascontiguousarray(w.data["optical"]))) for g, w in zip(got, want))
    resumed = dataset.for_rank(1, 2).with_state(StreamState.fresh(2, 2).after(2, 3))
    first = next(iter(resumed))[0]["optical"]
    assert torch.equal(first, torch.from_numpy(np.ascontiguousarray(_take(sampler.iter_stream(1, 2), 7)[6].data["optical"])))


# ------------------------------------------------------------------ jobs of processes


def _sleeper(folder: Path, fail_rank: int | None = None) -> list[str]:
    """A rank command that records its pid, then exits 3 (rank ``fail_rank``) or sleeps a minute."""
    code = (
        "import os, sys, time; rank = int(os.environ['RANK']); "
        f"open(os.path.join({str(folder)!r}, str(rank)), 'w').write(str(os.getpid())); "
        f"sys.exit(3) if rank == {fail_rank!r} else time.sleep(60)"
    )
    return [sys.executable, "-c", code]


def _pids(folder: Path, n: int, timeout: float = 30.0) -> list[int]:
    import time

    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return [int((folder / str(r)).read_text() or 0) for r in range(n)]


def test_a_failing_rank_stops_the_others_and_gives_its_status(tmp_path):
    import psutil

    folder = tmp_path / "pids"
    folder.mkdir()
    code = distributed.launch_local(_sleeper(folder, fail_rank=1), 3, grace_s=5)
    assert code == 3
    for pid in [int(f.read_text() or 0) for f in folder.iterdir()]:  # a rank stopped before it wrote its pid wrote none
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("victim", [0, 1])
def test_a_rank_killed_without_a_word_ends_the_job_in_one_line(tmp_path, capfd, victim):
    """A rank SIGKILLed (the OOM killer, a user's kill) printed nothing, and the job ended with status 137 and no
    line at all on stderr: the launcher names the rank and the signal, and what to do."""
    code = (
        "import os, signal, time; time.sleep(0.5)\n"
        f"if int(os.environ['RANK']) == {victim}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)"
    )
    started = time.monotonic()
    status = distributed.launch_local([sys.executable, "-c", code], 2, grace_s=5, killed_hint=": rerun it")
    assert status == 128 + signal.SIGKILL and time.monotonic() - started < 30
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [f"tilefuse: error: rank {victim} of the 2 processes was killed by SIGKILL (out of memory? or a kill), so the job stopped: rerun it"]


_JOINER = """
import json, os, sys, psutil, torch, torch.distributed as dist
from tilefuse import distributed
ranks = distributed.from_env()
port = int(os.environ["MASTER_PORT"])
served = any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.Process(os.getppid()).net_connections("tcp"))
with distributed.process_group(ranks, torch.device("cpu")) as group:
    total = group.sum(torch.tensor([float(sys.argv[1]) + ranks.rank]).numpy())
open(os.path.join(sys.argv[2], str(ranks.rank)), "w").write(json.dumps({"port": port, "served": served, "total": float(total[0])}))
"""


def test_two_jobs_at_once_rendezvous_on_ports_their_launchers_hold(tmp_path):
    """The launcher picked a free port, closed it and left rank 0 to bind it seconds later (after importing torch):
    another job started meanwhile could get or take the same port, failing on 'address already in use' or
    joining the other job's ranks. The launcher now serves the store on its port for the whole job."""
    import threading

    results, codes = {}, {}

    def job(name: str, base: float) -> None:
        folder = tmp_path / name
        folder.mkdir()
        codes[name] = distributed.launch_local([sys.executable, "-c", _JOINER, str(base), str(folder)], 2, grace_s=5)
        results[name] = [json.loads((folder / str(r)).read_text()) for r in range(2)]

    threads = [threading.Thread(target=job, args=(name, base)) for name, base in (("a", 100.0), ("b", 1000.0))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert codes == {"a": 0, "b": 0}
    assert [r["total"] for r in results["a"]] == [201.0, 201.0] and [r["total"] for r in results["b"]] == [2001.0, 2001.0]
    assert all(r["served"] for rs in results.values() for r in rs), results  # rank 0 no longer binds it late
    assert results["a"][0]["port"] != results["b"][0]["port"]


@pytest.mark.parametrize("nproc", [4 * (os.cpu_count() or 1) + 1, 1000, 10**9, 2.0, "2"])
def test_nproc_beyond_what_the_machine_holds_is_one_line_and_starts_nothing(tmp_path, nproc):
    """--nproc 1000 started a thousand ranks (each a process holding a model) until the machine gave up."""
    import tilefuse

    store = write(labelled_scene(32, 32), tmp_path / "a.zarr")
    with pytest.raises(InputError, match=r"^nproc= \(--nproc\) must be a whole number"):
        tilefuse.train("pad", [store], tmp_path / "run", hparams={"preset": "atto"}, steps=2, workers=0, progress=False, nproc=nproc)
    with pytest.raises(InputError, match=r"^nproc= \(--nproc\) must be a whole number of processes in 1\.\."):
        distributed.launch_local([sys.executable, "-c", "pass"], nproc if isinstance(nproc, int) else 10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


@pytest.mark.parametrize("stop, code", [("terminate", 128 + signal.SIGTERM), ("kill", -signal.SIGKILL)])
def test_a_stopped_launcher_stops_its_ranks(tmp_path, stop, code):
    """SIGTERM: the launcher stops its ranks. SIGKILL (the OOM killer, a kernel restart) runs no cleanup: the ranks,
    in sessions of their own, kept training and held the run folder's lock, so a --resume was refused until they
    finished; the kernel now ends them with their launcher."""
    import time

    import psutil

    folder = tmp_path / "pids"
    folder.mkdir()
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import sys; from tilefuse.distributed import launch_local; "
        f"sys.exit(launch_local({_sleeper(folder)!r}, 2, grace_s=5))"
    )])
    pids = _pids(folder, 2)
    getattr(launcher, stop)()
    assert launcher.wait(30) == code
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if psutil.pid_exists(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks outlived their launcher ({stop})"


class _Pool:
    """A fixed list of fully labelled samples; stream s of n hands out blocks of ``block``: s, s + n, ...

    With ``block`` = the per-rank batch B, rank r's batch i of a 2-rank job holds
    pool[2Bi + rB : 2Bi + (r + 1)B], so the two ranks' batches i together are
    batch i of one process with batch 2B (stream 0 of 1 hands out the pool in order).
    """

    def __init__(self, store: str, block: int, size: int = 96) -> None:
        from tilefuse.sampling import RandomPatchSampler

        sampler = RandomPatchSampler([store], list(BANDS), PATCH, window=64, patches_per_window=8, windows_per_round=2, seed=1)
        self.modalities = list(BANDS)
        self.samples = _take(sampler.iter_stream(0), size)
        for sample in self.samples:
            sample.label[sample.label == IGNORE] = 0  # every pixel counts: the mean loss of a batch is the mean of its halves
        self.block = block

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0):
        k = start
        while True:
            index = (k // self.block) * self.block * streams + stream * self.block + k % self.block
            yield self.samples[index % len(self.samples)]
            k += 1


def _job_parts(job: dict):
    from tilefuse.sampling import RandomPatchSampler

    if job["data"] == "pool":
        sampler = _Pool(job["store"], job["block"])
    else:
        sampler = RandomPatchSampler([job["store"]], list(BANDS), PATCH, window=64, patches_per_window=4, windows_per_round=2, seed=2)
    torch.manual_seed(job["settings"]["seed"])
    model = _Net(BANDS, 3)
    config = ModelConfig("test-ddp", dict(BANDS), 3, class_names=list(CLASSES), band_stats=IDENTITY)
    data = PatchDataset(sampler, IDENTITY, augment=job["data"] != "pool", seed=1)
    val = None
    if job.get("validate"):
        from tilefuse.sampling import GridPatchSampler

        val = PatchDataset(GridPatchSampler([job["store"]], list(BANDS), PATCH, window=64), IDENTITY, augment=False)
    return model, config, data, val


def _rank_main(path: str) -> None:
    """One rank of a test job (this file run as a script); JOB.json says what to train and where to fail."""
    job = json.loads(Path(path).read_text())
    rank = distributed.from_env().rank
    if rank > 0:
        def refuse(*args, **kwargs):
            raise AssertionError(f"rank {rank} wrote to the run folder")

        for name in ("save", "append_log", "truncate_log", "start"):
            setattr(RunDir, name, refuse)
    model, config, data, val = _job_parts(job)
    fail = job.get("fail", {})

    def on_step(step, loss):
        if fail.get("rank") == rank and fail.get("step") == step:
            if fail["how"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InputError(f"rank {rank} met bad data at step {step}")

    fit(model, config, data, val, TrainSettings(**job["settings"]), RunDir(job["run"]), resume=job.get("resume", False),
        progress=False, on_step=on_step)


def _launch(tmp_path: Path, name: str, job: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``job`` as ``nproc`` ranks in a child process (so this test's stderr stays clean): its exit status and output."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(job))
    code = (
        "import sys; from tilefuse.distributed import launch_local; "
        f"sys.exit(launch_local([sys.executable, {str(Path(__file__).resolve())!r}, {str(spec)!r}], {nproc}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.ENV_TIMEOUT: "120"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


SETTINGS = dict(lr=1e-2, workers=0, log_every=1, checkpoint_every=100, seed=7, torch_threads=1, grad_clip=1.0)


@pytest.fixture
def store(tmp_path) -> str:
    return str(write(labelled_scene(128, 128, seed=0), tmp_path / "a.zarr"))


@pytest.mark.slow
def test_two_ranks_follow_the_loss_curve_of_one_process_over_the_same_global_batch(store, tmp_path):
    """2 ranks x batch 4 against 1 process x batch 8, over the same 8 samples per step.

    The two computations are the same arithmetic up to the order of float32 sums
    (a mean over 8 samples against the mean of two means over 4, gradients summed
    by gloo): about 1e-7 relative per step, which Adam's normalised steps carry
    over without growth beyond ~1e-5 in 10 steps. 1e-4 is far below the change of
    the loss itself between steps (checked: the curve moves by > 1e-2).
    """
    steps = 10
    model, config, data, _ = _job_parts({"data": "pool", "store": store, "block": 4, "settings": {"seed": 7}})
    one = fit(model, config, data, None, TrainSettings(steps=steps, batch_size=8, **SETTINGS), RunDir(tmp_path / "one"), progress=False)
    assert one["step"] == steps
    job = {"data": "pool", "store": store, "block": 4, "run": str(tmp_path / "two"), "settings": dict(steps=steps, batch_size=4, **SETTINGS)}
    done = _launch(tmp_path, "two", job)
    assert done.returncode == 0, done.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert max(abs(a[s] - a[s + 1]) for s in range(1, steps)) > 1e-2, "the loss does not move: the comparison is empty"
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6), (s, a[s], b[s])
    record = [r for r in map(json.loads, (tmp_path / "two" / "log.jsonl").read_text().splitlines()) if "loss" in r][0]
    assert record["samples_per_s"] > 0
    wa = load_checkpoint(tmp_path / "one")[0].state_dict()
    wb = load_checkpoint(tmp_path / "two")[0].state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5) for k in wa)


@pytest.mark.slow
def test_a_killed_rank_then_a_restart_resumes_exactly_and_predict_loads_the_checkpoint(store, tmp_path):
    import tilefuse

    settings = dict(SETTINGS, steps=12, batch_size=3, checkpoint_every=4, workers=1, val_every=6)
    base = {"data": "patches", "store": store, "validate": True, "settings": settings}
    whole = _launch(tmp_path, "whole", {**base, "run": str(tmp_path / "whole")})
    assert whole.returncode == 0, whole.stderr
    broken = {**base, "run": str(tmp_path / "broken"), "fail": {"rank": 1, "step": 7, "how": "kill"}}
    died = _launch(tmp_path, "broken", broken)
    assert died.returncode == 128 + signal.SIGKILL, died.stderr
    assert read_config(tmp_path / "broken").extra["step"] == 4
    resumed = _launch(tmp_path, "resumed", {**base, "run": str(tmp_path / "broken"), "resume": True})
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "broken")
    assert sorted(b) == list(range(1, 13)) and b == a, "the resumed run's losses differ from the uninterrupted run's"
    wa = load_checkpoint(tmp_path / "whole")[0].state_dict()
    wb = load_checkpoint(tmp_path / "broken")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    val = [r["val"] for r in map(json.loads, (tmp_path / "whole" / "log.jsonl").read_text().splitlines()) if "val" in r]
    grid = PatchDataset(_job_parts({**base, "data": "patches"})[3].sampler, IDENTITY, augment=False)
    labelled = sum(int((t != IGNORE).sum()) for _, t in grid)
    assert val and val[-1]["pixels"] + val[-1]["unscored_pixels"] == labelled, "validation was not summed over both ranks' shares"

    # another world size is refused, naming both
    one = _launch(tmp_path, "one", {**base, "run": str(tmp_path / "broken"), "resume": True, "settings": dict(settings, steps=14)}, nproc=1)
    assert one.returncode == 2 or one.returncode == 1, one.stderr
    assert "trained by 2 process(es) x 1 worker(s), this job is 1 x 1" in one.stderr

    prediction = tilefuse.predict(tmp_path / "broken", store, tmp_path / "pred.zarr", tile=32, cluster="sync", progress=False)
    labels, valid = prediction["labels"].values, tilefuse.open_scene(store)["valid"].values
    assert (labels[valid] < 3).all() and (labels[~valid] == 255).all()


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_whole_job_with_its_message(store, tmp_path):
    job = {"data": "patches", "store": store, "run": str(tmp_path / "run"), "settings": dict(SETTINGS, steps=50, batch_size=2),
           "fail": {"rank": 1, "step": 3, "how": "raise"}}
    done = _launch(tmp_path, "error", job)
    assert done.returncode != 0
    assert "rank 1 met bad data at step 3" in done.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.ENV_TIMEOUT: "120"}
    return subprocess.run([sys.executable, "-m", "tilefuse.cli", "train", *args], capture_output=True, text=True, env=env, timeout=600)


def test_bad_input_of_a_job_of_two_raises_its_input_error(tmp_path, capfd):
    """The Python API's nproc=2 answers bad input like one process: its InputError (it was JobFailed, a
    RuntimeError saying 'its message is above', the line printed by the rank)."""
    import tilefuse

    nolabel = write(labelled_scene(64, 64).drop_vars("label"), tmp_path / "nolabel.zarr")
    with pytest.raises(InputError, match=r"^" + str(nolabel) + " has no labels: ingest it with --labels PATH"):
        tilefuse.train("pad", [nolabel], tmp_path / "run", hparams={"preset": "atto"}, steps=2, workers=0, progress=False, nproc=2)
    assert "has no labels" not in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_nproc_on_the_command_line(store, tmp_path):
    """``tilefuse train --nproc 2``: an error every rank meets is one line once; a run trains, resumes only with 2."""
    nolabel = write(labelled_scene(64, 64).drop_vars("label"), tmp_path / "nolabel.zarr")
    base = ["--model", "pad", "--hparam", "preset=atto", "--patch-size", "32", "--batch-size", "2", "--workers", "0", "--quiet"]
    bad = _cli(*base, "--nproc", "2", "--store", str(nolabel), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"tilefuse: error: {nolabel} has no labels: ingest it with --labels PATH to train on it"], bad.stderr
    assert not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    done = _cli(*base, "--nproc", "2", "--store", store, "--out", str(run), "--steps", "2", "--checkpoint-every", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trained 2 steps") and read_config(run).extra["step"] == 2
    assert not list(tmp_path.glob(".*.lock")), "the run lock was left behind"
    again = _cli(*base, "--store", store, "--out", str(run), "--steps", "2", "--resume")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "trained by 2 process(es) x 0 worker(s), this job is 1 x 0" in again.stderr and "--workers 0 for" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, ["tilefuse: interrupted"]), (signal.SIGTERM, 143, ["tilefuse: stopped by SIGTERM: {run} keeps its last checkpoint; continue it with --resume (Python: resume=True)"])])
def test_an_interrupted_job_of_two_gives_back_its_lock_and_leaves_nothing_half_written(store, tmp_path, sig, code, said):
    """Ctrl-C (or a batch system's SIGTERM) of ``tilefuse train --nproc 2``: the launcher SIGTERMed each rank's
    whole process group, so rank 0 died at once, mid-checkpoint: its run lock stayed (a --resume on another host
    was refused), a half-written state folder stayed in the run, and every rank's DataLoader semaphores were
    reported as 'leaked semaphore objects' by the resource tracker. Each rank now stops and cleans up first."""
    import psutil

    run = tmp_path / "run"
    args = ["--model", "pad", "--hparam", "preset=atto", "--patch-size", "32", "--batch-size", "2", "--workers", "1", "--quiet",
            "--nproc", "2", "--store", store, "--out", str(run), "--steps", "100000", "--checkpoint-every", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.ENV_TIMEOUT: "120"}
    launcher = subprocess.Popen([sys.executable, "-m", "tilefuse.cli", "train", *args], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run / "state").is_dir() and time.monotonic() < deadline:  # a checkpoint written: in the loop
            time.sleep(0.1)
        ranks = [p.pid for p in psutil.Process(launcher.pid).children()]
        time.sleep(0.5)  # most likely in the middle of writing the next checkpoint
        launcher.send_signal(sig)
        assert launcher.wait(60) == code
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.stderr.read().strip().splitlines() == [line.format(run=run) for line in said]
    assert len(ranks) == 2 and not [pid for pid in ranks if psutil.pid_exists(pid)]
    assert not list(tmp_path.glob(".*")), "the run lock was left behind"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".tilefuse-output"]
    assert read_config(run).extra["step"] >= 1


def test_a_sigterm_ends_any_command_by_giving_back_what_it_holds(store, tmp_path):
    """SIGTERM (a batch system's cancel or time limit) killed ``tilefuse train`` in one process at once: its run
    lock stayed, and a half-written state folder with it. The CLI now unwinds every command on SIGTERM."""
    run = tmp_path / "run"
    args = ["--model", "pad", "--hparam", "preset=atto", "--patch-size", "32", "--batch-size", "2", "--workers", "0", "--quiet",
            "--store", store, "--out", str(run), "--steps", "100000", "--checkpoint-every", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tilefuse.cli", "train", *args], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run / "state").is_dir() and time.monotonic() < deadline:  # a checkpoint written: in the loop
            time.sleep(0.1)
        time.sleep(0.5)
        process.terminate()
        assert process.wait(60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    said = f"tilefuse: stopped by SIGTERM: {run} keeps its last checkpoint; continue it with --resume (Python: resume=True)"
    assert process.stderr.read().strip().splitlines() == [said]  # one line: no traceback, no shutdown noise
    assert not list(tmp_path.glob(".*")), "the run lock was left behind"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".tilefuse-output"]
    assert read_config(run).extra["step"] >= 1


def test_a_nested_terminating_block_says_its_own_line(capfd):
    """The CLI's outer :func:`terminating` gives way to predict's, which says what the store keeps."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as stopped, terminating(), terminating("inner says this"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert capfd.readouterr().err.strip() == "tilefuse: inner says this"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_sigterm_line_comes_after_what_the_block_prints_while_it_unwinds(capfd):
    """``train --nproc 2`` without --quiet: the launcher said its line as the signal came, and rank 0's progress
    bar, redrawn as the rank stopped, came after it. The line is now said once the block has unwound."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit), terminating("the run keeps its last checkpoint"), terminating():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                print("train:  33%|###       | 2/6", file=sys.stderr, flush=True)  # a rank's bar, closed as it stops
        lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
        assert lines == ["train:  33%|###       | 2/6", "tilefuse: the run keeps its last checkpoint"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_only_a_sigterm_says_the_line_not_a_later_exit_of_the_same_process(capfd):
    """A process that met a SIGTERM once (a notebook, a test session) said a block's SIGTERM line at every later
    SystemExit inside such a block: only the exit a SIGTERM raised says it."""
    from tilefuse.signals import stopping

    stopping.set()  # as after an earlier SIGTERM of this process
    try:
        with pytest.raises(SystemExit), terminating("stopped by SIGTERM: ..."):
            raise SystemExit(3)
        assert "stopped by SIGTERM" not in capfd.readouterr().err
    finally:
        stopping.clear()


def test_sigterm_becomes_an_exit_only_where_it_had_its_default_action():
    """A SIGTERM ignored by the caller (nohup, a supervisor) was made fatal for the run, and a program's own
    handler replaced, by the handler that unwinds predict and the launcher."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        for handler in (signal.SIG_IGN, lambda *_: None):
            signal.signal(signal.SIGTERM, handler)
            with terminating():
                assert signal.getsignal(signal.SIGTERM) is handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with pytest.raises(SystemExit) as stopped:
            with terminating():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises in this thread at once
        assert stopped.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
