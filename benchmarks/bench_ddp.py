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

Prints per repeat and the median and spread (min-max) of the N-vs-1 ratio and
of the 1-rank data path against the model alone.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_ddp.py [--steps 40] [--repeats 3] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
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


def job_rate(store: str, run: Path, nproc: int, args) -> float:
    """Median global samples/s of the log windows after the first, of one training job of ``nproc`` ranks."""
    kwargs = dict(
        model=args.model, stores=[store], out=str(run), hparams={"preset": args.preset}, overwrite=True, progress=False,
        steps=args.steps, batch_size=args.batch, patch_size=args.patch, workers=args.workers, log_every=args.log_every,
        checkpoint_every=args.steps, val_fraction=0.0, torch_threads=1, seed=1,
    )
    distributed.launch_call("tilefuse.pipelines.train:train", kwargs, nproc)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    return statistics.median(rates)


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
        ones, manys, models = [], [], []
        for repeat in range(args.repeats):
            ones.append(job_rate(store, folder / "one", 1, args))
            manys.append(job_rate(store, folder / "many", args.nproc, args))
            models.append(model_rate(args, bands, classes))
            print(f"repeat {repeat}: 1 rank {ones[-1]:.1f} samples/s, {args.nproc} ranks {manys[-1]:.1f} samples/s "
                  f"(x{manys[-1] / ones[-1]:.2f}), model step alone {models[-1]:.1f} samples/s", flush=True)
    scaling = [m / o for m, o in zip(manys, ones)]
    feed = [o / m for o, m in zip(ones, models)]
    print(f"{args.nproc} ranks vs 1 (samples/s, one torch thread each, {args.workers} workers per rank): "
          f"median x{statistics.median(scaling):.2f}, spread x{min(scaling):.2f}-x{max(scaling):.2f} over {args.repeats} repeats")
    print(f"1 rank, full data path vs model step alone: median {statistics.median(feed):.2f}, spread {min(feed):.2f}-{max(feed):.2f}")


if __name__ == "__main__":
    main()
