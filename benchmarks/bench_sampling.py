"""Random-patch throughput from a zarr scene store, against the usual ways of reading patches.

In one run, on one store on disk (5 bands: 3 optical + 2 SAR, float32, chunks
512 px, shards 2048 px, Blosc zstd), random 256 px patches per second from:

1. xarray ``isel`` per patch (the store opened with ``open_scene``),
2. direct zarr slicing per patch,
3. cutting from an in-memory numpy array (the ceiling),
4. ``RandomPatchSampler`` (one decode per chunk window, several patches per
   window, shuffled across windows), raw and through ``PatchDataset``
   (normalised, flipped/rotated, as tensors).

Then whether a 2-worker DataLoader keeps a small PAD training step fed: seconds
per step with batches from the DataLoader against the same step on one cached
batch.

    .venv/bin/python benchmarks/bench_sampling.py [--size 4096] [--store PATH] [--seconds 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

PATCH = 256


def make_store(path: Path, size: int) -> Path:
    from tilefuse.scene import write_scene
    from tilefuse.synthetic import synth_scene

    if path.exists():
        return path
    ds = synth_scene(size, "sar-optical", seed=0)
    ds = ds.isel(optical_band=slice(0, 3))
    write_scene(ds, path)
    return path


def rate(read_one, seconds: float, min_count: int = 5) -> float:
    """Patches per second of ``read_one()`` over about ``seconds``."""
    read_one()  # warm-up (opens files, imports)
    count, start = 0, time.perf_counter()
    while count < min_count or time.perf_counter() - start < seconds:
        read_one()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--store", type=Path, default=Path("/tmp/tilefuse-bench-sampling.zarr"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pad-steps", type=int, default=6)
    args = parser.parse_args()

    import zarr

    from tilefuse.dataset import PatchDataset, pooled_band_stats
    from tilefuse.sampling import RandomPatchSampler
    from tilefuse.scene import open_scene

    t0 = time.perf_counter()
    path = make_store(args.store, args.size)
    print(f"store {path} ({args.size} x {args.size} px, 5 bands) ready in {time.perf_counter() - t0:.1f} s")
    ds = open_scene(path)
    group = zarr.open_group(path, mode="r")
    rng = np.random.default_rng(0)
    high = args.size - PATCH

    def origin():
        return rng.integers(0, high + 1, size=2)

    def xarray_patch():
        y, x = origin()
        window = {"y": slice(y, y + PATCH), "x": slice(x, x + PATCH)}
        return ds["optical"].isel(window).values, ds["sar"].isel(window).values

    def zarr_patch():
        y, x = origin()
        return group["optical"][:, y : y + PATCH, x : x + PATCH], group["sar"][:, y : y + PATCH, x : x + PATCH]

    memory = {name: group[name][...] for name in ("optical", "sar")}

    def memory_patch():
        y, x = origin()
        return memory["optical"][:, y : y + PATCH, x : x + PATCH].copy(), memory["sar"][:, y : y + PATCH, x : x + PATCH].copy()

    results = {}
    results["xarray isel per patch"] = rate(xarray_patch, args.seconds)
    results["zarr slice per patch"] = rate(zarr_patch, args.seconds)
    results["in-memory array (ceiling)"] = rate(memory_patch, args.seconds, 200)
    del memory

    stats = pooled_band_stats([ds], ["optical", "sar"])
    for per_window in (16, 32, 64):
        t0 = time.perf_counter()
        sampler = RandomPatchSampler(
            [path], ["optical", "sar"], PATCH, min_labelled=0.05, window=1024, patches_per_window=per_window, windows_per_round=8, seed=0
        )
        index_s = time.perf_counter() - t0
        stream = sampler.iter_stream(0)
        results[f"RandomPatchSampler, {per_window} patches/window (index {index_s:.1f} s)"] = rate(lambda: next(stream), args.seconds, 64)
        if per_window in (32, 64):
            tensors = iter(PatchDataset(sampler, stats, augment=True))
            results[f"  + PatchDataset (normalise, augment, tensors), {per_window}/window"] = rate(lambda: next(tensors), args.seconds, 64)

    reference = results["xarray isel per patch"]
    print(f"\nrandom {PATCH} px patches, 5 bands, from {path.name}")
    for name, value in results.items():
        print(f"  {name:<62} {value:9.1f} patches/s  {value / reference:7.1f} x xarray")

    window, stride = sampler.geometry[0]
    print(f"  (read windows {window} px, stride {stride} px: whole 512 px chunks only; 8 windows per round)")
    feeding(path, sampler_kwargs=dict(min_labelled=0.05, window=1024, patches_per_window=64, windows_per_round=8), stats=stats, steps=args.pad_steps)


def feeding(path: Path, sampler_kwargs: dict, stats: dict, steps: int, batch: int = 4) -> None:
    """Seconds per PAD (atto) training step with a 2-worker DataLoader vs one cached batch."""
    import torch

    from tilefuse.dataset import PatchDataset
    from tilefuse.sampling import RandomPatchSampler
    from tilefuse.tile_model import build_model
    from tilefuse.training import make_loader

    torch.manual_seed(0)
    model = build_model("pad", {"optical": 3, "sar": 2}, 6, preset="atto")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = RandomPatchSampler([path], ["optical", "sar"], PATCH, seed=1, **sampler_kwargs)
    loader = make_loader(PatchDataset(sampler, stats), batch_size=batch, workers=2, seed=0)
    batches = iter(loader)

    def step(inputs, target):
        loss = model.compute_loss(inputs, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    cached = next(batches)
    step(*cached)  # warm-up
    time.sleep(20)  # let the workers fill their prefetch queues: measure the steady state
    cached_s, loader_s, waits = [], [], []
    for _ in range(steps):  # alternate, so the load of a shared machine hits both alike
        t0 = time.perf_counter()
        step(*cached)
        cached_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        inputs, target = next(batches)
        waits.append(time.perf_counter() - t0)
        step(inputs, target)
        loader_s.append(time.perf_counter() - t0)
    cached_m, loader_m = float(np.median(cached_s)), float(np.median(loader_s))
    print(f"\nPAD atto training step, batch {batch} x {PATCH} px, CPU ({torch.get_num_threads()} torch threads), median of {steps}:")
    print(f"  cached batch                      {cached_m:6.2f} s/step")
    print(f"  2-worker DataLoader               {loader_m:6.2f} s/step  (waiting for data: median {np.median(waits):.3f} s, max {max(waits):.3f} s)")
    print(f"  data-fed step / cached step       {loader_m / cached_m:6.2f}")


if __name__ == "__main__":
    main()
