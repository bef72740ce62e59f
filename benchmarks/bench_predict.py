"""Benchmark ``tilefuse predict``: efficiency, the common peer, memory against scene size, workers.

    python benchmarks/bench_predict.py [--size 1024] [--memory-sizes 4096 8192 16384] [--workdir DIR]

Every figure is measured in the same run, on the same machine, against a
reference measured next to it:

1. efficiency = (the model alone on the same number of tiles, same batch size)
   / (end to end, scene store to prediction store, checkpoint loading
   included), with PAD (small ``atto`` preset, random weights) on a synthetic
   SAR + optical scene of ``--size`` px, in wall time and in CPU time (the
   latter is robust to other processes on a shared machine);
2. the same model through MONAI's ``sliding_window_inference`` over the whole
   scene in memory (the common peer): throughput and peak memory;
3. throughput with 1 and 2 local workers (blocks of half the scene edge);
4. peak RSS of one worker at each ``--memory-sizes`` scene edge, next to the
   in-memory peer's, with a small conv net (memory does not depend on the
   model's cost, and PAD on a 16,384 px scene takes hours on a CPU).

Tiles are 256 px with 64 px overlap (MONAI: overlap 0.25), gaussian blending,
batches of 4. Peak memory is the resident high-water mark (VmHWM) of a fresh
process (the dask worker; a child process for MONAI), so the torch baseline is
in both. Timings are the best of ``--repeat`` runs (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tilefuse.tile_model import TileModel, TileModelSpec, register_model

TILE, OVERLAP, BATCH = 256, 64, 4
CLASSES = 7


class SmallConvNet(TileModel):
    """A small conv net (3x3 then 1x1 convs) for the memory section: cheap, margin 0, blended."""

    def __init__(self, modalities: dict[str, int], num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.spec = TileModelSpec(dict(modalities), num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(sum(modalities.values()), width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, num_classes, 1)
        )

    def forward(self, inputs):
        return self.body(torch.cat([inputs[name] for name in self.spec.modalities], dim=1))


@register_model("bench-conv", "small conv net (benchmarks only)")
def build_bench_conv(modalities, num_classes, **hparams):
    return SmallConvNet(dict(modalities), num_classes, **hparams)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from a forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _checkpoint(model_name: str, modalities: dict[str, int], out: Path, **hparams) -> Path:
    from tilefuse.checkpoint import ModelConfig, save_checkpoint
    from tilefuse.tile_model import build_model

    torch.manual_seed(0)
    model = build_model(model_name, modalities, CLASSES, **hparams)
    config = ModelConfig(model_name, modalities, CLASSES, hparams, [f"class {k}" for k in range(CLASSES)])
    return save_checkpoint(model, config, out)


def _modalities(scene: Path) -> dict[str, int]:
    from tilefuse.scene import band_dim, modalities, open_scene

    ds = open_scene(scene)
    return {name: int(ds.sizes[band_dim(name)]) for name in modalities(ds)}


def _random_scene(path: Path, size: int) -> Path:
    """A ``size`` px square scene of random optical (3 bands) and SAR (2 bands), written chunk by chunk."""
    import dask.array as da
    import rioxarray  # noqa: F401
    import xarray as xr

    from tilefuse.scene import write_scene

    if path.exists():
        return path
    rng = da.random.default_rng(size)
    ds = xr.Dataset(
        {
            "optical": (("optical_band", "y", "x"), rng.standard_normal((3, size, size), dtype=np.float32, chunks=(3, 2048, 2048))),
            "sar": (("sar_band", "y", "x"), rng.standard_normal((2, size, size), dtype=np.float32, chunks=(2, 2048, 2048))),
            "valid": (("y", "x"), da.ones((size, size), dtype=bool, chunks=2048)),
        },
        coords={"x": 10.0 * np.arange(size) + 5, "y": -10.0 * np.arange(size) - 5},
    ).rio.write_crs("EPSG:32632")
    return write_scene(ds, path)


def _tiles_run(scene: Path) -> int:
    """Tiles the engine runs on ``scene``: those whose output holds a valid pixel."""
    from tilefuse.grid import TileGrid
    from tilefuse.scene import open_scene

    valid = open_scene(scene)["valid"].values
    grid = TileGrid(*valid.shape, TILE, OVERLAP)
    return sum(
        bool(valid[r : r + TILE, c : c + TILE].any()) for r in grid.row_origins for c in grid.col_origins
    )


def model_alone_seconds(checkpoint: Path, tiles: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the model on ``tiles`` random tiles in full batches of BATCH: forward and softmax only."""
    from tilefuse.checkpoint import load_checkpoint

    model, config = load_checkpoint(checkpoint)
    batch = {name: torch.randn(BATCH, bands, TILE, TILE) for name, bands in config.modalities.items()}
    with torch.inference_mode():
        torch.softmax(model(batch), 1)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(math.ceil(tiles / BATCH)):
            torch.softmax(model(batch), 1)
    return time.perf_counter() - wall, time.process_time() - cpu


def predict_seconds(checkpoint: Path, scene: Path, out: Path, cluster="sync", block_size: int | None = None) -> tuple[float, float]:
    """(wall, CPU of this process) seconds of one prediction, checkpoint loading included."""
    import tilefuse
    from tilefuse.cluster import plugin

    plugin._RUNNERS.clear()  # a cold start, as from the command line: load the checkpoint again
    wall, cpu = time.perf_counter(), time.process_time()
    tilefuse.predict(
        checkpoint, scene, out, tile=TILE, overlap=OVERLAP, blend="gaussian", batch_size=BATCH,
        block_size=block_size, cluster=cluster, overwrite=True, progress=False,
    )  # fmt: skip
    return time.perf_counter() - wall, time.process_time() - cpu


def on_workers(checkpoint: Path, scene: Path, out: Path, workers: int, block_size: int | None = None) -> tuple[float, float]:
    """(seconds, largest worker peak RSS in MB) of one prediction on a fresh ``local:workers`` cluster."""
    from tilefuse.cluster.client import close_client, make_client

    client = make_client(f"local:{workers}")
    try:
        seconds, _ = predict_seconds(checkpoint, scene, out, cluster=client, block_size=block_size)
        peaks = client.run(_peak_rss_mb)
    finally:
        close_client(client)
    return seconds, max(peaks.values())


def monai_child(checkpoint: str, scene: str) -> None:
    """Runs in a fresh process: whole scene in memory through sliding_window_inference; prints JSON."""
    from monai.inferers import sliding_window_inference

    from tilefuse.checkpoint import load_checkpoint
    from tilefuse.scene import band_stats, normalise, open_scene

    model, config = load_checkpoint(checkpoint)
    names = list(config.modalities)
    splits = np.cumsum([config.modalities[n] for n in names])[:-1].tolist()
    ds = open_scene(scene)
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    stacked = np.concatenate([normalise(ds[n].values, *band_stats(ds, n)) for n in names])
    inputs = torch.from_numpy(stacked)[None]

    def predictor(x: torch.Tensor) -> torch.Tensor:
        parts = torch.tensor_split(x, splits, dim=1)
        return torch.softmax(model(dict(zip(names, parts))), 1)

    with torch.inference_mode():
        probs = sliding_window_inference(inputs, TILE, BATCH, predictor, overlap=OVERLAP / TILE, mode="gaussian")
        labels = probs.argmax(1).to(torch.uint8).numpy()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "baseline_mb": baseline, "pixels": labels.size}))


def monai(checkpoint: Path, scene: Path, script: str = __file__) -> dict:
    """Run :func:`monai_child` in a fresh process of ``script`` (a benchmark whose import registers the model)."""
    # dask's nannies export thread and malloc settings into this process's environment: keep them from the peer
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
    result = subprocess.run(
        [sys.executable, script, "--monai-child", str(checkpoint), str(scene)], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _monai_fits(size: int, bands: int) -> bool:
    """Whether the in-memory peer fits in half the free memory (input, output, weights, counts in float32)."""
    import psutil

    need = 4 * size * size * (bands + 2 * CLASSES + 2)
    return need < psutil.virtual_memory().available / 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="scene edge for the PAD sections")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--workdir", type=Path, default=Path("bench-predict"))
    parser.add_argument("--repeat", type=int, default=2, help="timings are the best of this many runs")
    parser.add_argument("--sections", nargs="*", default=["efficiency", "peer", "workers", "memory"], help="what to run")
    parser.add_argument("--keep", action="store_true", help="keep the scenes and predictions")
    parser.add_argument("--monai-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.monai_child:
        monai_child(*args.monai_child)
        return

    from tilefuse.pipelines.synth import synth

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"tile": TILE, "overlap": OVERLAP, "batch": BATCH, "torch_threads": torch.get_num_threads()}
    print(f"machine: {torch.get_num_threads()} torch threads; tiles {TILE} px, overlap {OVERLAP}, batch {BATCH}", flush=True)

    # 1-3: PAD on a synthetic scene
    scene = work / f"synth-{args.size}.zarr"
    if not scene.exists():
        synth(scene, args.size)
    pad = _checkpoint("pad", _modalities(scene), work / "pad-atto", preset="atto")
    tiles = _tiles_run(scene)
    megapixels = args.size**2 / 1e6
    figures["pad"] = {"scene_px": args.size, "tiles": tiles}
    if "efficiency" in args.sections:
        efficiency(args, figures, pad, scene, tiles, megapixels, work)
    if "peer" in args.sections:
        peer = monai(pad, scene)
        figures["pad"]["monai"] = {
            "seconds": round(peer["seconds"], 2),
            "mpx_per_s": round(megapixels / peer["seconds"], 4),
            "peak_rss_mb": round(peer["peak_rss_mb"]),
        }
        print(f"MONAI sliding_window_inference (whole scene in memory): {peer['seconds']:.1f} s, "
              f"{megapixels / peer['seconds']:.4f} Mpx/s, peak RSS {peer['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    if "workers" in args.sections:
        for workers in (1, 2):
            # blocks of half the scene edge (four blocks), so that a second worker has work too
            seconds, peak = on_workers(pad, scene, work / f"pad-{workers}w.zarr", workers, block_size=max(512, args.size // 2))
            figures["pad"][f"local_{workers}"] = {"seconds": round(seconds, 2), "mpx_per_s": round(megapixels / seconds, 4)}
            print(f"local:{workers}: {seconds:.1f} s, {megapixels / seconds:.4f} Mpx/s (worker peak RSS {peak:.0f} MB)", flush=True)
    if "memory" in args.sections:
        memory(args, figures, work)
    print(json.dumps(figures, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def efficiency(args, figures: dict, pad: Path, scene: Path, tiles: int, megapixels: float, work: Path) -> None:
    """Model alone vs store to store, interleaved, best of --repeat (the machine's load drifts between runs)."""
    runs = [(model_alone_seconds(pad, tiles), predict_seconds(pad, scene, work / "pad.zarr")) for _ in range(args.repeat)]
    alone = min(wall for (wall, _), _ in runs)
    end_to_end = min(wall for _, (wall, _) in runs)
    alone_cpu = min(cpu for (_, cpu), _ in runs)
    end_to_end_cpu = min(cpu for _, (_, cpu) in runs)
    figures["pad"].update({
        "model_alone_s": round(alone, 2),
        "end_to_end_s": round(end_to_end, 2),
        "efficiency": round(alone / end_to_end, 3),
        "model_alone_cpu_s": round(alone_cpu, 2),
        "end_to_end_cpu_s": round(end_to_end_cpu, 2),
        "efficiency_cpu": round(alone_cpu / end_to_end_cpu, 3),
        "mpx_per_s": round(megapixels / end_to_end, 4),
    })
    print(f"PAD atto, {args.size}^2 px, {tiles} tiles: model alone {alone:.1f} s, store to store {end_to_end:.1f} s "
          f"(checkpoint loading included): efficiency {alone / end_to_end:.3f}; in CPU time {alone_cpu:.1f} / "
          f"{end_to_end_cpu:.1f} s = {alone_cpu / end_to_end_cpu:.3f}; {megapixels / end_to_end:.4f} Mpx/s", flush=True)  # fmt: skip


def memory(args, figures: dict, work: Path) -> None:
    """Peak RSS of one worker against scene size, next to the in-memory peer's (small conv net)."""
    conv = None
    figures["memory"] = []
    for size in args.memory_sizes:
        big = _random_scene(work / f"random-{size}.zarr", size)
        conv = conv or _checkpoint("bench-conv", _modalities(big), work / "conv")
        seconds, peak = on_workers(conv, big, work / f"conv-{size}.zarr", 1)
        row = {"scene_px": size, "seconds": round(seconds, 1), "mpx_per_s": round(size**2 / 1e6 / seconds, 3), "worker_peak_rss_mb": round(peak)}
        if _monai_fits(size, 5):
            peer = monai(conv, big)
            row["monai_peak_rss_mb"] = round(peer["peak_rss_mb"])
            row["monai_mpx_per_s"] = round(size**2 / 1e6 / peer["seconds"], 3)
        figures["memory"].append(row)
        print(f"{size}^2 px, small conv net: local:1 worker peak RSS {peak:.0f} MB ({row['mpx_per_s']} Mpx/s); "
              f"MONAI peak RSS {row.get('monai_peak_rss_mb', 'skipped: would not fit in half the free memory')} MB",
              flush=True)  # fmt: skip
        if not args.keep:
            shutil.rmtree(big, ignore_errors=True)
            shutil.rmtree(work / f"conv-{size}.zarr", ignore_errors=True)
    peaks = [row["worker_peak_rss_mb"] for row in figures["memory"]]
    if peaks:
        figures["memory_flatness"] = round(max(peaks) / min(peaks), 3)
        print(f"worker peak RSS, largest / smallest scene: {max(peaks) / min(peaks):.3f} (flat within 20 % if <= 1.2)")


if __name__ == "__main__":
    main()
