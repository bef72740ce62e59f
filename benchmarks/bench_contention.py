"""Training speed on a quiet CPU and beside other busy processes (issue 8: training under contention).

Trains the demo's PAD (atto preset, batch 4, 128 px patches, no loader
workers) for a few steps in a fresh child process per run, quiet and then
with ``--hogs`` busy-looping Python processes beside it, and prints steps/s
(median over ``--repeats`` runs, first logged window dropped as warm-up).
The child gets the environment of the variant under test, so OpenMP's wait
policy and torch's threads are what the child would get from that
environment.

    python benchmarks/bench_contention.py --repeats 3 --hogs 2
    python benchmarks/bench_contention.py --variants before,default   # before/after in one run

Variants: ``default`` (what a user gets: tilefuse sets OpenMP's wait policy
to PASSIVE unless the environment sets one), ``before`` (libgomp's own
default, as before tilefuse set one: spin a while, then sleep), ``active`` /
``passive`` (OpenMP told to spin / to sleep while waiting), ``threads1``
(one torch thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
from tilefuse.pipelines.train import train
store, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
threads = None if sys.argv[4] == "none" else int(sys.argv[4])
train("pad", [store], out, steps=steps, batch_size=4, patch_size=128, lr=1e-3, workers=0,
      log_every=5, checkpoint_every=10**6, val_fraction=0.0, torch_threads=threads, progress=False)
import torch
records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l]
print(json.dumps({"steps_per_s": [r["samples_per_s"] / 4 for r in records[1:]], "threads": torch.get_num_threads()}))
"""

VARIANTS = {
    "default": ({}, "none"),
    "before": ({"OMP_WAIT_POLICY": ""}, "none"),  # set but empty: libgomp's own default (spin, then sleep)
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, "none"),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "none"),
    "threads1": ({}, "1"),
}


def run_child(store: Path, steps: int, variant: str) -> tuple[float, int]:
    env_extra, threads = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(store), str(Path(tmp) / "run"), str(steps), threads],
            env=env, capture_output=True, text=True, check=False,
        )
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return statistics.median(report["steps_per_s"]), report["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=2)
    parser.add_argument("--variants", default="default,spin")
    args = parser.parse_args()

    from tilefuse.pipelines.synth import synth

    with tempfile.TemporaryDirectory() as tmp:
        store = synth(Path(tmp) / "scene.zarr", 512, seed=0)
        print(f"cpus {os.cpu_count()}, {args.steps} steps per run, median of {args.repeats}; steps/s")
        for variant in args.variants.split(","):
            for hogs in (0, args.hogs):
                procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
                try:
                    time.sleep(0.5 if hogs else 0)
                    runs = [run_child(store, args.steps, variant) for _ in range(args.repeats)]
                finally:
                    for proc in procs:
                        proc.kill()
                        proc.wait()
                speeds = [s for s, _ in runs]
                print(
                    f"{variant:9s} hogs {hogs}: median {statistics.median(speeds):.3f} "
                    f"(runs {', '.join(f'{s:.3f}' for s in speeds)}; torch threads {runs[0][1]})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
