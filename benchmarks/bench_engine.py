"""Benchmark the inference engine's ceiling: how close end to end gets to decoding its inputs.

    python benchmarks/bench_engine.py [--sizes 4096 16384] [--repeat 3] [--country] [--pad-size 1024] [--scenes DIR]

All in one run, on the same scene and tiles (256 px, overlap 64, batch 4, gaussian blending):

1. the I/O floor: decode every array of the scene store once with zarr, in
   one thread, block by block (what the engine must read);
2. the near-free model alone (one broadcast multiply, softmax included) on as
   many tiles as the scene has, in full batches;
3. end to end, scene store to prediction store, with the near-free model:
   ``sync`` (its default read-ahead: none on a CPU whose cores torch takes),
   ``sync`` reading one block ahead, ``local:1`` and ``local:2`` (clusters
   started beforehand with their default task threads; the run includes
   checkpoint loading), then runner options on ``sync`` (``channels_last``,
   ``bf16``, ``compile`` with ``--compile``);
4. MONAI's ``sliding_window_inference``, same model, whole scene in memory
   (when monai is importable and the scene fits in half the free memory);
5. PAD (``atto`` preset, random weights) on a ``--pad-size`` scene: model
   alone / end to end (``sync``, default and reading one block ahead), the efficiency;
6. ``--country``: a 32,768^2 px scene on ``local:2`` with the near-free
   model: Mpx/s, peak RSS per worker and of the scheduler (slow on a laptop).

Every figure prints its ratio to the reference measured in the same run:
engine / I/O floor (target >= 0.5 per worker), local:2 / local:1 (>= 1.6),
PAD efficiency (>= 0.95), worker peak RSS largest / smallest scene (<= 1.2).
Timings are the median of ``--repeat`` runs, with their spread (min..max).
Peak RSS is each process's VmHWM (workers are fresh per cluster).
Scenes (``random-SIZE.zarr``) are made in ``--workdir`` unless ``--scenes`` names
a folder that holds them already (it is only read, never deleted).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import _checkpoint, _modalities, _peak_rss_mb, _random_scene  # noqa: E402

from tilefuse.tile_model import TileModel, TileModelSpec, register_model  # noqa: E402

TILE, OVERLAP, BATCH = 256, 64, 4
CLASSES = 7


class NearFree(TileModel):
    """One broadcast multiply: logits = first band of the first modality x a per-class scale. Costs almost nothing."""

    def __init__(self, modalities: dict[str, int], num_classes: int) -> None:
        super().__init__()
        self.spec = TileModelSpec(dict(modalities), num_classes)
        self.scale = nn.Parameter(torch.linspace(-1, 1, num_classes)[:, None, None])

    def forward(self, inputs):
        first = inputs[next(iter(self.spec.modalities))]
        return first[:, :1] * self.scale


@register_model("bench-free", "near-free model (benchmarks only)")
def build_free(modalities, num_classes, **hparams):
    return NearFree(dict(modalities), num_classes)


def _timed(function, repeat: int) -> tuple[float, float, float]:
    """(median, min, max) wall seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def io_floor(scene: Path, block: int = 2048) -> None:
    """Decode every array of the store once, block by block, in this thread (zarr's own decoding as it comes)."""
    from tilefuse import storage

    group = storage.open_group(scene)
    for name, array in group.arrays():
        if array.ndim < 2 or name in ("x", "y"):
            continue
        height, width = array.shape[-2:]
        for r in range(0, height, block):
            for c in range(0, width, block):
                array[(..., slice(r, r + block), slice(c, c + block))]


def model_alone(checkpoint: Path, tiles: int) -> None:
    from tilefuse.checkpoint import load_checkpoint

    model, config = load_checkpoint(checkpoint)
    batch = {name: torch.randn(BATCH, bands, TILE, TILE) for name, bands in config.modalities.items()}
    with torch.inference_mode():
        for _ in range(math.ceil(tiles / BATCH)):
            torch.softmax(model(batch), 1)


def _tiles(size: int) -> int:
    from tilefuse.grid import TileGrid

    return TileGrid(size, size, TILE, OVERLAP).num_tiles


def end_to_end(checkpoint: Path, scene: Path, out: Path, cluster="sync", **options) -> None:
    import tilefuse
    from tilefuse.cluster import plugin

    plugin._RUNNERS.clear()  # a cold start in this process: load the checkpoint again
    tilefuse.predict(
        checkpoint, scene, out, tile=TILE, overlap=OVERLAP, blend="gaussian", batch_size=BATCH,
        cluster=cluster, overwrite=True, progress=False, **options,
    )  # fmt: skip


def _row(figures: dict, key: str, seconds: tuple[float, float, float], megapixels: float, reference: float | None = None, what: str = "") -> float:
    median, low, high = seconds
    rate = megapixels / median
    figures[key] = {"mpx_per_s": round(rate, 3), "seconds": [round(low, 3), round(median, 3), round(high, 3)]}
    ratio = ""
    if reference:
        figures[key]["ratio"] = round(rate / reference, 3)
        ratio = f"  ({rate / reference:.3f} {what})"
    print(f"  {key:<34} {rate:8.2f} Mpx/s  median {median:6.2f} s  [{low:.2f} .. {high:.2f}]{ratio}", flush=True)
    return rate


def _scene(args, size: int, work: Path) -> Path:
    """The random ``size`` px scene: from ``--scenes`` where it is there, else made in ``work``."""
    if args.scenes is not None and (args.scenes / f"random-{size}.zarr").exists():
        return args.scenes / f"random-{size}.zarr"
    return _random_scene(work / f"random-{size}.zarr", size)


def scene_section(args, size: int, work: Path, results: dict) -> None:
    from tilefuse.cluster.client import close_client, make_client

    scene = _scene(args, size, work)
    free = _checkpoint("bench-free", _modalities(scene), work / "free")
    megapixels = size * size / 1e6
    figures: dict = {"scene_px": size, "tiles": _tiles(size)}
    results[f"scene_{size}"] = figures
    print(f"{size}^2 px, {figures['tiles']} tiles, near-free model:", flush=True)
    floor = _row(figures, "io_floor", _timed(lambda: io_floor(scene), args.repeat), megapixels)
    _row(figures, "model_alone", _timed(lambda: model_alone(free, figures["tiles"]), args.repeat), megapixels, floor, "of the I/O floor")
    out = work / "pred.zarr"
    _row(figures, "sync", _timed(lambda: end_to_end(free, scene, out), args.repeat), megapixels, floor, "of the I/O floor")
    _row(figures, "sync_prefetch_1", _timed(lambda: end_to_end(free, scene, out, prefetch=1), args.repeat), megapixels, floor, "of the I/O floor")
    rates, peaks = {}, {}
    for workers in (1, 2):
        client = make_client(f"local:{workers}")
        try:
            threads = sorted({info["nthreads"] for info in client.scheduler_info(n_workers=-1)["workers"].values()})
            key = f"local_{workers}"
            rates[workers] = _row(
                figures, key, _timed(lambda: end_to_end(free, scene, out, cluster=client), args.repeat), megapixels,
                floor * workers, f"of the I/O floor x {workers} workers; {threads} task threads per worker",
            )  # fmt: skip
            peaks[workers] = max(client.run(_peak_rss_mb).values())
            figures[key]["worker_peak_rss_mb"] = round(peaks[workers])
            figures[key]["task_threads"] = threads
        finally:
            close_client(client)
    figures["local_2_over_local_1"] = round(rates[2] / rates[1], 3)
    print(f"  local:2 / local:1 = {rates[2] / rates[1]:.3f} (target >= 1.6); worker peak RSS {peaks}", flush=True)
    if args.options:
        for name, options in (("sync_channels_last", {"channels_last": True}), ("sync_bf16", {"precision": "bf16"})):
            _row(figures, name, _timed(lambda: end_to_end(free, scene, out, **options), args.repeat), megapixels, figures["sync"]["mpx_per_s"], "of sync fp32")
        if args.compile:
            _row(figures, "sync_compile", _timed(lambda: end_to_end(free, scene, out, compile=True), 1), megapixels, figures["sync"]["mpx_per_s"], "of sync (compile time included)")
    monai(free, scene, size, figures, floor)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


def monai(checkpoint: Path, scene: Path, size: int, figures: dict, floor: float) -> None:
    import importlib.util

    from bench_predict import _monai_fits
    from bench_predict import monai as monai_peer

    if importlib.util.find_spec("monai") is None:
        print("  MONAI: skipped (monai is not importable: pip install 'tilefuse[bench]')", flush=True)
        return
    if not _monai_fits(size, 5):
        print("  MONAI: skipped (the whole scene would not fit in half the free memory)", flush=True)
        return
    peer = monai_peer(checkpoint, scene, script=__file__)  # bench_predict's peer: tiles, overlap and batch are ours
    _row(figures, "monai_sliding_window", (peer["seconds"],) * 3, size * size / 1e6, floor, "of the I/O floor")
    figures["monai_sliding_window"]["peak_rss_mb"] = round(peer["peak_rss_mb"])


def pad_section(args, work: Path, results: dict) -> None:
    from tilefuse.pipelines.synth import synth

    scene = work / f"synth-{args.pad_size}.zarr"
    if not scene.exists():
        synth(scene, args.pad_size)
    pad = _checkpoint("pad", _modalities(scene), work / "pad-atto", preset="atto")
    tiles = _tiles(args.pad_size)
    megapixels = args.pad_size**2 / 1e6
    figures: dict = {"scene_px": args.pad_size, "tiles": tiles}
    results["pad_atto"] = figures
    print(f"PAD atto, {args.pad_size}^2 px, {tiles} tiles:", flush=True)
    alone = _row(figures, "model_alone", _timed(lambda: model_alone(pad, tiles), args.repeat), megapixels)
    _row(figures, "sync", _timed(lambda: end_to_end(pad, scene, work / "pad.zarr"), args.repeat), megapixels, alone, "= efficiency, target >= 0.95")
    _row(figures, "sync_prefetch_1", _timed(lambda: end_to_end(pad, scene, work / "pad.zarr", prefetch=1), args.repeat), megapixels, alone, "= efficiency, one block read ahead")


def country_section(args, work: Path, results: dict) -> None:
    from tilefuse.cluster.client import close_client, make_client

    size = args.country_size
    scene = _scene(args, size, work)
    free = _checkpoint("bench-free", _modalities(scene), work / "free")
    client = make_client("local:2")
    try:
        seconds = _timed(lambda: end_to_end(free, scene, work / "country.zarr", cluster=client), 1)
        figures: dict = {"scene_px": size}
        results[f"country_{size}"] = figures
        print(f"{size}^2 px on local:2, near-free model:", flush=True)
        _row(figures, "local_2", seconds, size * size / 1e6)
        figures["worker_peak_rss_mb"] = sorted(round(v) for v in client.run(_peak_rss_mb).values())
        figures["scheduler_peak_rss_mb"] = round(client.run_on_scheduler(_peak_rss_mb))
        print(f"  peak RSS per worker {figures['worker_peak_rss_mb']} MB, scheduler {figures['scheduler_peak_rss_mb']} MB", flush=True)
    finally:
        close_client(client)
        if not args.keep:
            shutil.rmtree(work / "country.zarr", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[4096], help="scene edges of the engine-ceiling section")
    parser.add_argument("--repeat", type=int, default=3, help="timings are the median of this many runs")
    parser.add_argument("--pad-size", type=int, default=1024, help="scene edge of the PAD section (0: skip)")
    parser.add_argument("--options", action="store_true", help="also time channels_last and bf16 on sync")
    parser.add_argument("--compile", action="store_true", help="with --options, also torch.compile (slow to compile)")
    parser.add_argument("--country", action="store_true", help="also the --country-size scene on local:2 (slow here)")
    parser.add_argument("--country-size", type=int, default=32768)
    parser.add_argument("--workdir", type=Path, default=Path("bench-engine"))
    parser.add_argument("--scenes", type=Path, help="folder of random-SIZE.zarr scenes made beforehand (read only)")
    parser.add_argument("--keep", action="store_true", help="keep the scenes and predictions")
    parser.add_argument("--monai-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.monai_child:
        from bench_predict import monai_child

        monai_child(*args.monai_child)
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"tile": TILE, "overlap": OVERLAP, "batch": BATCH, "torch_threads": torch.get_num_threads()}
    print(f"machine: {torch.get_num_threads()} torch threads; tiles {TILE} px, overlap {OVERLAP}, batch {BATCH}", flush=True)
    try:
        for size in args.sizes:
            scene_section(args, size, work, results)
        if args.pad_size:
            pad_section(args, work, results)
        if args.country:
            country_section(args, work, results)
        rss = [results[f"scene_{s}"]["local_1"]["worker_peak_rss_mb"] for s in args.sizes]
        if args.country:
            rss += results[f"country_{args.country_size}"]["worker_peak_rss_mb"]
        if len(rss) > 1:
            results["worker_rss_flatness"] = round(max(rss) / min(rss), 3)
            print(f"worker peak RSS, largest / smallest: {max(rss) / min(rss):.3f} (target <= 1.2)")
        print(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
