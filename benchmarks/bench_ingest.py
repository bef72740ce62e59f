"""Ingest throughput and peak memory on synthetic sar-optical scenes read from GeoTIFFs.

For each size: write the scene as GeoTIFFs (``tilefuse synth --geotiff``'s
writer), then, each in a fresh process so peak RSS is its own:

- reference: read every band of the GeoTIFFs window by window with rasterio
  (decode only, nothing kept) -- the floor any ingest pays;
- ingest: ``tilefuse ingest`` (GeoTIFFs -> scene store with valid mask,
  labels and band statistics), through its Python function.

Prints Mpx/s, the ratio to the plain read, and peak RSS; the 16,384^2 scene
must stay under 2 GB. Needs about 12 GB of free disk for 16,384^2 (in a
temporary folder, removed afterwards).

    .venv/bin/python benchmarks/bench_ingest.py [--sizes 4096 16384] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_BYTES = 2 << 30


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_synth(size: int, folder: Path) -> dict:
    from tilefuse.synthetic import synth_scene, write_geotiffs

    start = time.perf_counter()
    write_geotiffs(synth_scene(size, "sar-optical", seed=0), folder)
    return {"seconds": time.perf_counter() - start}


def child_read(size: int, folder: Path) -> dict:
    import rasterio
    from rasterio.windows import Window

    start = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=256 << 20):
        for name in ("optical", "sar", "label"):
            with rasterio.open(folder / f"{name}.tif") as src:
                for row in range(0, src.height, 1024):
                    for col in range(0, src.width, 1024):
                        src.read(window=Window(col, row, min(1024, src.width - col), min(1024, src.height - row)))
    return {"seconds": time.perf_counter() - start}


def child_ingest(size: int, folder: Path) -> dict:
    from tilefuse.pipelines.ingest import ingest

    start = time.perf_counter()
    ingest(
        folder / "scene.zarr",
        {"optical": folder / "optical.tif", "sar": folder / "sar.tif"},
        folder / "label.tif",
        overwrite=True,
    )
    return {"seconds": time.perf_counter() - start}


CHILDREN = {"synth": child_synth, "read": child_read, "ingest": child_ingest}


def run_child(step: str, size: int, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", step, str(size), str(folder)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{step} {size} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary files go [default: $TMPDIR]")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, size, folder = args.child
        result = CHILDREN[step](int(size), Path(folder))
        print(json.dumps({**result, "peak_rss": _peak_rss_bytes()}))
        return

    import os

    print(f"ingest benchmark: {os.cpu_count()} CPUs, dask threaded scheduler")
    print(f"{'size':>7} {'synth s':>8} {'read Mpx/s':>11} {'ingest s':>9} {'ingest Mpx/s':>13} {'vs read':>8} "
          f"{'read RSS':>9} {'ingest RSS':>11} {'store GB':>9}")  # fmt: skip
    failed = False
    for size in args.sizes:
        folder = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{size}-", dir=args.workdir))
        try:
            synth = run_child("synth", size, folder)
            read = run_child("read", size, folder)
            ingest = run_child("ingest", size, folder)
            megapixels = size * size / 1e6
            store_gb = sum(p.stat().st_size for p in (folder / "scene.zarr").rglob("*") if p.is_file()) / 1e9
            read_rate, ingest_rate = megapixels / read["seconds"], megapixels / ingest["seconds"]
            print(
                f"{size:>7} {synth['seconds']:>8.1f} {read_rate:>11.1f} {ingest['seconds']:>9.1f} {ingest_rate:>13.2f} "
                f"{ingest_rate / read_rate:>8.2f} {read['peak_rss'] / 2**20:>7.0f}MB {ingest['peak_rss'] / 2**20:>9.0f}MB "
                f"{store_gb:>9.2f}",
                flush=True,
            )
            if size >= 16384 and ingest["peak_rss"] > LIMIT_BYTES:
                print(f"FAIL: {size}^2 ingest peaked at {ingest['peak_rss'] / 2**30:.2f} GB > 2 GB")
                failed = True
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
