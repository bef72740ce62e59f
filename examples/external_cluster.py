"""Predict on a dask cluster started outside tilefuse, on this machine (loopback only).

    python examples/external_cluster.py WORKDIR [--workers 2] [--size 256] [--checkpoint RUN]

1. writes a synthetic SAR + optical scene (``tilefuse synth``) and, unless
   ``--checkpoint`` is given, a small PAD checkpoint with random weights;
2. starts ``dask scheduler --scheduler-file WORKDIR/scheduler.json`` and
   ``--workers`` ``dask worker`` processes (two task threads each: one runs the model, one reads the next block ahead) against it;
3. runs ``tilefuse predict --cluster WORKDIR/scheduler.json`` and exports a COG;
4. stops the scheduler and workers, whatever happened.

The processes stand in for a cluster started by a batch system: on SLURM the
same cluster comes from dask-jobqueue (``cluster/slurm.md``), on Kubernetes
from the dask operator (``cluster/kubernetes.yaml``). tilefuse only needs the
scheduler's address or file, and every worker must read the same paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DASK = [sys.executable, "-m", "dask"]
QUIET = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "warning"}
TILEFUSE = [sys.executable, "-m", "tilefuse.cli"]


def _run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def _random_pad_checkpoint(scene: Path, out: Path) -> Path:
    """A PAD (atto preset) checkpoint with random weights for the scene's modalities."""
    import torch

    from tilefuse.checkpoint import ModelConfig, save_checkpoint
    from tilefuse.scene import band_dim, modalities, open_scene
    from tilefuse.tile_model import build_model

    ds = open_scene(scene)
    bands = {name: int(ds.sizes[band_dim(name)]) for name in modalities(ds)}
    class_names = list(ds["label"].attrs.get("class_names", [])) or ["class 0", "class 1"]
    torch.manual_seed(0)
    model = build_model("pad", bands, len(class_names), preset="atto")
    config = ModelConfig("pad", bands, len(class_names), {"preset": "atto"}, class_names)
    return save_checkpoint(model, config, out)


def _wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file() or not path.read_text().strip():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the scheduler did not write {path} within {timeout:.0f} s")
        time.sleep(0.2)


def _stop(processes: list[subprocess.Popen]) -> None:
    """Interrupt the workers, then the scheduler (each exits cleanly on SIGINT); kill what hangs."""
    for group in (processes[1:], processes[:1]):
        for process in group:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in group:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="edge of the synthetic scene in px")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint [default: random-weight PAD atto]")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the cluster to come up")
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    scene = work / "scene.zarr"
    if not scene.exists():
        _run([*TILEFUSE, "synth", str(scene), "--size", str(args.size)])
    checkpoint = args.checkpoint or _random_pad_checkpoint(scene, work / "pad-random")
    scheduler_file = work / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)

    processes: list[subprocess.Popen] = []
    try:
        processes.append(
            subprocess.Popen(
                [*DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                 "--scheduler-file", str(scheduler_file)],  # fmt: skip
                env=QUIET,
            )
        )
        _wait_for_file(scheduler_file, args.timeout)
        address = json.loads(scheduler_file.read_text())["address"]
        print(f"scheduler at {address}", flush=True)
        for _ in range(args.workers):
            processes.append(
                subprocess.Popen(
                    [*DASK, "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                     "--nthreads", "2", "--memory-limit", "4GB", "--death-timeout", "60"],  # fmt: skip
                    env=QUIET,
                )
            )
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(args.workers, timeout=args.timeout)

        prediction = work / "prediction.zarr"
        _run(
            [*TILEFUSE, "predict", "--checkpoint", str(checkpoint), "--store", str(scene), "--out", str(prediction),
             "--cluster", str(scheduler_file), "--tile", "64", "--overlap", "16", "--block-size", "128",
             "--batch-size", "4", "--torch-threads", "1", "--overwrite"]  # fmt: skip
        )
        _run([*TILEFUSE, "export", str(prediction), str(work / "prediction.tif"), "--overwrite"])
    finally:
        _stop(processes)
        shutil.rmtree(work / "dask-scratch-space", ignore_errors=True)
    print(f"done: {work / 'prediction.zarr'} and {work / 'prediction.tif'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
