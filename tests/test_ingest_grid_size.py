"""`tilefuse ingest` onto an absurdly fine grid: one line, from the grid's dimensions, before any dask graph.

A pixel size far too small (``--resolution 1e-8`` for a scene in degrees) grew memory for minutes while a graph
of millions of tasks was built, and only then met the free-space check; ``1e-300`` was a traceback
(``OverflowError`` formatting the pixel count, ``TypeError`` from ``da.empty`` with ``--allow-large``).
Nothing here allocates the grid: :func:`dask.array.empty` is made to fail for more than 10^6 chunks.
"""

from __future__ import annotations

import math
import re
import shutil
import time
import types
from pathlib import Path

import dask.array
import pytest

import tilefuse.rasters
from tilefuse.pipelines.ingest import ingest
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.synthetic import synth_scene, write_geotiffs


@pytest.fixture(scope="module")
def sar(tmp_path_factory) -> Path:
    """A 64 x 64 px GeoTIFF of 10 m pixels (640 m across, UTM)."""
    folder = tmp_path_factory.mktemp("tifs")
    return write_geotiffs(synth_scene(64, seed=3, chunk=64), folder)["sar"]


@pytest.fixture(autouse=True)
def no_huge_graph(monkeypatch):
    """``da.empty`` of more than 10^6 chunks fails the test instead of building the graph."""
    real = dask.array.empty

    def guarded(shape, *args, chunks=None, **kwargs):
        blocks = math.prod(math.ceil(int(n) / int(c if isinstance(c, int) else c[0])) for n, c in zip(shape, chunks))
        assert blocks <= 10**6, f"a dask graph of {blocks} chunks was built for shape {shape}"
        return real(shape, *args, chunks=chunks, **kwargs)

    monkeypatch.setattr(dask.array, "empty", guarded)


def free_space(monkeypatch, free: int) -> None:
    """Every filesystem reports ``free`` bytes free."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=free, used=0, free=free))


def refused(args, capsys, out: Path) -> str:
    """Run the CLI; assert exit 2 with exactly one stderr line, no traceback, and no output; return that line."""
    started = time.monotonic()
    code = main([str(a) for a in args])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tilefuse: error: "), err
    assert "Traceback" not in err
    assert elapsed < 10, f"refused only after {elapsed:.1f} s"
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == [], "something was left beside the output"
    return lines[0]


def test_free_space_is_checked_from_the_grid_before_any_graph(sar, tmp_path, monkeypatch, capsys):
    # 1e-4 m pixels: 6.4e6 x 6.4e6 px (4e13 px, 4e7 read blocks); the store would need ~40 TB, 1 GB is free
    free_space(monkeypatch, 1 << 30)
    out = tmp_path / "out" / "scene.zarr"
    out.parent.mkdir()
    line = refused(["ingest", out, "-m", f"sar={sar}", "--resolution", "1e-4", "--allow-large"], capsys, out)
    assert "not enough free space" in line and "needs about" in line and "TB" in line, line


def test_free_space_estimate_is_write_scenes(sar, tmp_path, monkeypatch, capsys):
    """Refused up front where write_scene's own check (raw bytes / 8) would refuse it, and only there."""
    out = tmp_path / "out" / "scene.zarr"
    out.parent.mkdir()
    args = ["ingest", out, "-m", f"sar={sar}", "--resolution", "1e-4", "--allow-large"]
    needed = 6_400_000**2 * (2 * 4 + 1) // 8  # 6.4e6 x 6.4e6 px: 2 float32 sar bands + valid (1 byte)
    free_space(monkeypatch, needed - 1)
    assert "not enough free space" in refused(args, capsys, out)
    free_space(monkeypatch, needed)  # room enough: the next bound (read blocks) refuses it, still before any graph
    line = refused(args, capsys, out)
    assert "free space" not in line and "read blocks" in line, line


def test_absurd_graph_is_refused_even_with_room_on_disk(sar, tmp_path, monkeypatch, capsys):
    free_space(monkeypatch, 1 << 100)
    out = tmp_path / "out" / "scene.zarr"
    out.parent.mkdir()
    line = refused(["ingest", out, "-m", f"sar={sar}", "--resolution", "1e-4", "--allow-large"], capsys, out)
    assert "read blocks" in line and "--allow-large" in line and "--resolution" in line, line
    with pytest.raises(InputError, match=r"allow_large=.*resolution="):  # the Python API names its parameters
        ingest(out, {"sar": sar}, resolution=1e-4, allow_large=True)
    assert not out.exists()


@pytest.mark.parametrize("allow_large", [False, True], ids=["limit", "allow-large"])
@pytest.mark.parametrize("resolution", ["1e-155", "1e-300", "1e-310", "5e-324"])
def test_any_tiny_resolution_is_one_readable_line(sar, tmp_path, capsys, resolution, allow_large):
    out = tmp_path / "out" / "scene.zarr"
    out.parent.mkdir()
    args = ["ingest", out, "-m", f"sar={sar}", "--resolution", resolution, *(["--allow-large"] if allow_large else [])]
    line = refused(args, capsys, out)
    assert not re.search(r"\d{13}", line), f"an unreadable number: {line}"
    assert len(line) < 400, line
    assert "resolution" in line, line


def test_pixel_counts_of_any_size_read_as_three_digits():
    from tilefuse.rasters import check_grid_size

    with pytest.raises(InputError, match=r"4\.6e\+298 x 4\.6e\+298 px \(2\.12e\+597 px, more than the limit of 1e\+10\)"):
        check_grid_size(46 * 10**297, 46 * 10**297)
    with pytest.raises(InputError, match=r"192 x 192 px \(3\.69e\+04 px"):  # small grids as before
        check_grid_size(192, 192, 100)
    assert tilefuse.rasters._count(10**5000) == "1e+5000"
