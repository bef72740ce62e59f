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

``--section path``: the full data path (sampler + PatchDataset) against the
xarray per-patch read, measured in alternation (one round of the sampler, then
40 xarray patches, ``--repeats`` times), so the load of a shared machine hits
both alike; prints the median and the spread of the per-repeat ratios, by wall
time and by CPU time of the process.

``--section archive``: start-up of training data over archives of N small
stores (N in ``--archive``; copies of one 256 px store) and over the one large
store: seconds from the store list to the first batch
(:func:`tilefuse.training_data.assemble` + one batch), the px of ``valid`` +
``label`` read (counted at the reader) and px read per second, then the same
start on a restart that finds the saved index (:meth:`TrainingData.save`).

    .venv/bin/python benchmarks/bench_sampling.py [--size 4096] [--store PATH] [--seconds 8]
    .venv/bin/python benchmarks/bench_sampling.py --section path --repeats 9
    .venv/bin/python benchmarks/bench_sampling.py --section archive --archive 10 30 100
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
    parser.add_argument("--section", choices=["all", "throughput", "path", "archive"], default="all")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--archive", type=int, nargs="+", default=[10, 30, 100])
    args = parser.parse_args()
    if args.section in ("path", "archive"):
        path = make_store(args.store, args.size)
        if args.section == "path":
            data_path(path, args.repeats)
        else:
            archive_startup(path, args.archive)
        return

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
    if args.section == "all":
        data_path(path, args.repeats)
        archive_startup(path, args.archive)


def data_path(path: Path, repeats: int) -> None:
    """Full data path (sampler + PatchDataset) vs xarray isel per patch, in alternation; median and spread of ratios."""
    from tilefuse.dataset import PatchDataset, pooled_band_stats
    from tilefuse.sampling import RandomPatchSampler
    from tilefuse.scene import open_scene

    ds = open_scene(path)
    size = ds.sizes["y"]
    rng = np.random.default_rng(0)

    def xarray_patch():
        y, x = rng.integers(0, size - PATCH + 1, size=2)
        window = {"y": slice(y, y + PATCH), "x": slice(x, x + PATCH)}
        return ds["optical"].isel(window).values, ds["sar"].isel(window).values

    sampler = RandomPatchSampler([path], ["optical", "sar"], PATCH, min_labelled=0.05, window=1024, patches_per_window=64, windows_per_round=8, seed=0)
    tensors = iter(PatchDataset(sampler, pooled_band_stats([ds], ["optical", "sar"]), augment=True))

    def timed(read_one, count: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(count):
            read_one()
        return count / (time.perf_counter() - wall), count / max(time.process_time() - cpu, 1e-9)

    xarray_patch(), next(tensors)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        reference = timed(xarray_patch, 40)
        full = timed(lambda: next(tensors), sampler.round_size)  # one whole round: its decodes and its patches
        wall.append(full[0] / reference[0])
        cpu.append(full[1] / reference[1])
    print(f"\nfull data path (RandomPatchSampler 64/window + PatchDataset) vs xarray isel per patch, {PATCH} px, {repeats} alternating repeats:")
    for name, ratios in (("wall time", wall), ("CPU time", cpu)):
        q = np.percentile(ratios, [0, 25, 50, 75, 100])
        print(f"  by {name:<9}: median {q[2]:5.1f} x  (quartiles {q[1]:.1f}..{q[3]:.1f}, range {q[0]:.1f}..{q[4]:.1f})")


def archive_startup(large: Path, counts: list[int], edge: int = 256) -> None:
    """Seconds to the first batch over archives of many small stores and one large store, cold and with a saved index."""
    import shutil
    import tempfile

    from tilefuse.sampling import SceneReader
    from tilefuse.scene import write_scene
    from tilefuse.synthetic import synth_scene
    from tilefuse.training_data import DataOptions, assemble

    read_px = {"n": 0}
    original = SceneReader.read

    def counting(self, y0, y1, x0, x1, names):
        read_px["n"] += (y1 - y0) * (x1 - x0) * sum(name in ("valid", "label") for name in names)
        return original(self, y0, y1, x0, x1, names)

    SceneReader.read = counting

    def start(stores, run, patch):
        """(seconds to the first batch, px of valid + label read before sampling began, the training data)."""
        read_px["n"] = 0
        t0 = time.perf_counter()
        data = assemble("pad", stores, data=DataOptions(patch_size=patch), hparams={"preset": "atto"}, seed=0, run=run)
        index_px = read_px["n"]
        batch = [sample for sample, _ in zip(data.train, range(8))]
        assert len(batch) == 8
        return time.perf_counter() - t0, index_px, data

    root = Path(tempfile.mkdtemp(prefix="tilefuse-bench-archive-"))
    try:
        ds = synth_scene(edge, "sar-optical", seed=1, chunk=128).isel(optical_band=slice(0, 3))
        source = write_scene(ds, root / "source.zarr", chunk=128, shard=None)
        start([source], None, 64)  # warm-up: imports, first model build
        print(f"\ntraining data start-up (PAD atto, patches; seconds to the first batch of 8), archives of {edge} px stores (copies):")
        print("  (Mpx read: valid + label px read by the split and the index, before sampling; restart: with the saved index)")
        print(f"  {'stores':>10} {'Mpx':>7} {'cold s':>7} {'Mpx read':>9} {'Mpx/s':>7} {'restart s':>10} {'Mpx read':>9}")
        copies = [Path(shutil.copytree(source, root / f"s{i:04d}.zarr")) for i in range(max(counts))]
        sets = [(f"{n} x {edge}", copies[:n], 64) for n in sorted(counts)]
        sets.append((f"1 x {SceneReader(large).shape[0]}", [large], PATCH))
        for name, stores, patch in sets:
            run = root / f"run-{len(stores)}-{patch}"
            run.mkdir()
            cold_s, cold_px, data = start(stores, None, patch)
            data.save(run)
            warm_s, warm_px, _ = start(stores, run, patch)
            mpx = sum(np.prod(SceneReader(p).shape) for p in stores) / 1e6
            print(f"  {name:>10} {mpx:7.1f} {cold_s:7.2f} {cold_px / 1e6:9.1f} {cold_px / 1e6 / cold_s:7.1f} {warm_s:10.2f} {warm_px / 1e6:9.1f}")
    finally:
        SceneReader.read = original
        shutil.rmtree(root, ignore_errors=True)


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
