"""Data-parallel training throughput on CPU: 2 gloo processes against 1, and the model's step rate alone.

In one run, on one synthetic store on disk, ``--repeats`` times in alternation
(so the load of a shared machine hits both alike):

1. ``tilefuse.pipelines.train.train`` launched as a job of 1 rank and as a job
   of ``--nproc`` ranks (:func:`tilefuse.distributed.launch_call`, one torch
   thread per rank, ``--workers`` DataLoader workers per rank): global samples/s
   of the full training step (sampling, normalisation, augmentation, tensors,
   forward, backward, gradient all-reduce, AdamW) from the run's log, the first
   log window (start-up, first batch) left out;
2. the model's step alone at one thread: forward + backward + AdamW on one
   cached batch, samples/s.

On a machine shared with other work the wall-clock ratio says more about the
load than about DDP, so each configuration also runs a short job, and the CPU
seconds its ranks spend per sample beyond start-up (long job less short job)
give the parallel efficiency, CPU per sample of 1 rank over that of N: N x
efficiency is the speed-up on N free cores.

Prints per repeat and the median and spread (min-max) of the N-vs-1 ratio,
the efficiency, and the 1-rank data path against the model alone.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_ddp.py [--steps 40] [--repeats 3] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tilefuse import distributed


def make_store(folder: Path, size: int) -> str:
    """A synthetic SAR + optical scene of ``size`` px with labels (``tilefuse synth``)."""
    from tilefuse.cli import main

    path = folder / "scene.zarr"
    if main(["synth", str(path), "--size", str(size), "--kind", "sar-optical", "--seed", "1"]) != 0:
        sys.exit("could not write the synthetic scene")
    return str(path)


def job(store: str, run: Path, nproc: int, steps: int, args) -> tuple[float, float]:
    """One training job of ``nproc`` ranks: median global samples/s of its log windows after the first,
    and the CPU seconds (user + system) of all its ranks, start-up included."""
    kwargs = dict(
        model=args.model, stores=[store], out=str(run), hparams={"preset": args.preset}, overwrite=True, progress=False,
        steps=steps, batch_size=args.batch, patch_size=args.patch, workers=args.workers, log_every=args.log_every,
        checkpoint_every=steps, val_fraction=0.0, torch_threads=1, seed=1,
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    distributed.launch_call("tilefuse.pipelines.train:train", kwargs, nproc)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    return statistics.median(rates), (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_per_sample(store: str, run: Path, nproc: int, args) -> tuple[float, float]:
    """samples/s of a ``--steps`` job of ``nproc`` ranks, and its marginal CPU seconds per sample: the CPU of
    that job less that of a ``--steps // 4`` job, over the samples between (start-up cancels out)."""
    short = max(args.log_every * 2, args.steps // 4)
    _, cpu_short = job(store, run, nproc, short, args)
    rate, cpu_long = job(store, run, nproc, args.steps, args)
    return rate, (cpu_long - cpu_short) / ((args.steps - short) * args.batch * nproc)


def store_bands(store: str) -> tuple[dict[str, int], int]:
    """Band count of each modality and number of classes of ``store``."""
    from tilefuse.classes import store_class_names
    from tilefuse.scene import band_dim, modalities, open_scene

    ds = open_scene(store)
    return {n: int(ds[n].sizes[band_dim(n)]) for n in modalities(ds)}, len(store_class_names(ds))


def model_rate(args, bands: dict[str, int], classes: int, seconds: float = 5.0) -> float:
    """samples/s of forward + backward + AdamW on one cached batch, one torch thread."""
    from tilefuse.tile_model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(args.model, bands, classes, preset=args.preset).train()
    b, p = args.batch, args.patch
    inputs = {name: torch.randn(b, c, p, p) for name, c in model.spec.modalities.items()}
    target = torch.randint(0, model.spec.num_classes, (b, p, p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model.compute_loss(inputs, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * b / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pad")
    parser.add_argument("--preset", default="atto")
    parser.add_argument("--size", type=int, default=1024, help="synthetic scene edge in px")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="per-rank batch")
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = make_store(folder, args.size)
        bands, classes = store_bands(store)
        ones, manys, models, efficiency = [], [], [], []
        for repeat in range(args.repeats):
            one, cpu_one = cpu_per_sample(store, folder / "one", 1, args)
            many, cpu_many = cpu_per_sample(store, folder / "many", args.nproc, args)
            ones.append(one)
            manys.append(many)
            efficiency.append(cpu_one / cpu_many)
            models.append(model_rate(args, bands, classes))
            print(f"repeat {repeat}: 1 rank {one:.1f} samples/s ({1e3 * cpu_one:.0f} CPU ms/sample), {args.nproc} ranks "
                  f"{many:.1f} samples/s ({1e3 * cpu_many:.0f} CPU ms/sample): x{many / one:.2f} wall, efficiency {efficiency[-1]:.2f}; "
                  f"model step alone {models[-1]:.1f} samples/s", flush=True)
    scaling = [m / o for m, o in zip(manys, ones)]
    feed = [o / m for o, m in zip(ones, models)]
    print(f"{args.nproc} ranks vs 1 (samples/s, one torch thread each, {args.workers} workers per rank): "
          f"median x{statistics.median(scaling):.2f}, spread x{min(scaling):.2f}-x{max(scaling):.2f} over {args.repeats} repeats")
    print(f"parallel efficiency (CPU per sample, 1 rank / {args.nproc} ranks): median {statistics.median(efficiency):.2f}, "
          f"spread {min(efficiency):.2f}-{max(efficiency):.2f}: x{args.nproc * statistics.median(efficiency):.2f} on {args.nproc} free cores")
    print(f"1 rank, full data path vs model step alone: median {statistics.median(feed):.2f}, spread {min(feed):.2f}-{max(feed):.2f}")


if __name__ == "__main__":
    main()
