"""Messages of the info / evaluate / export pipelines: one line, the right line, and a note where scores mislead."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tilefuse
from predict_fixtures import CLASSES, save_pointwise
from test_sampling import labelled_scene as sampling_scene, write
from tilefuse.cli import main
from tilefuse.errors import InputError, clipped
from tilefuse.outputs import local_path
from tilefuse.pipelines.evaluate import evaluate
from tilefuse.pipelines.export import export
from tilefuse.scene import write_scene

SIZE = 64


def labelled_scene(h: int, w: int, seed: int):
    """test_sampling's scene (optical 3 bands, sar 2, labels of 3 classes) named as the pointwise model's classes."""
    ds = sampling_scene(h, w, seed=seed)
    ds["label"].attrs["class_names"] = CLASSES[:3]
    return ds


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Scene A, its prediction by a pointwise checkpoint, and scene B: another seed on A's grid."""
    root = tmp_path_factory.mktemp("messages")
    a = write(labelled_scene(SIZE, SIZE, seed=0), root / "a.zarr")
    b = write(labelled_scene(SIZE, SIZE, seed=1), root / "b.zarr")
    checkpoint = save_pointwise(root / "pointwise")
    tilefuse.predict(checkpoint, a, root / "pred.zarr", tile=32, overlap=8, cluster="sync", progress=False)
    return {"root": root, "a": a, "b": b, "pred": root / "pred.zarr", "checkpoint": checkpoint}


# 1. a Dataset for a path: accepted by info, and a refusal that stays one line


def test_info_takes_the_dataset_open_scene_returns(scenes):
    scene = tilefuse.open_scene(scenes["a"])
    assert tilefuse.info(scene, verify=False) == tilefuse.info(scenes["a"], verify=False)
    with pytest.raises(InputError, match=r"^store= is the prediction store .*, not a scene store: pass a scene store$"):
        tilefuse.info(tilefuse.open_prediction(scenes["pred"]))


def test_a_refused_object_is_quoted_on_one_line(scenes):
    """The repr of a Dataset spans many lines: quoted as is, the 'one line' error was a dozen in Python."""
    with pytest.raises(InputError) as refused:
        local_path(tilefuse.open_scene(scenes["a"]), "store")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and message.startswith("store must be a path"), message
    assert "<xarray.Dataset> Size:" in message and "Dimensions: (" in message  # whitespace collapsed, not dropped
    for text in ("a\nb", "a\r\nb", "a\tb\x0bc\x0cd", "a\x1cb\x1dc\x1ed\x85e\u2028f\u2029g", "lead\n\n   trail\n"):
        assert len(clipped(text).splitlines()) == 1, repr(clipped(text))
    assert clipped("x" * 100, 20) == "x" * 17 + "..."
    assert clipped("a \n\t b") == "a b"


# 2. evaluate against another scene on the same grid: one note on stderr


def test_labels_of_another_scene_on_the_grid_get_a_note(scenes, capfd, tmp_path):
    pred, a, b = scenes["pred"], scenes["a"], scenes["b"]
    scored = evaluate(pred, b)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tilefuse: note: "), err
    assert str(b) in err and str(a) in err and "is not the scene" in err, err
    assert scored["pixels"] > 0 and "note" not in json.dumps(scored)  # scored all the same, the note not in the metrics
    # --json: stdout is the JSON document alone, the note goes to stderr
    assert main(["evaluate", str(pred), "--labels", str(b), "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["pixels"] == scored["pixels"] and "note" not in out
    assert [line for line in err.splitlines() if line.startswith("tilefuse:")] == [err.splitlines()[0]] and "is not the scene" in err
    # its scene moved away: the checkpoint's config says what the digest covers, B is still told apart
    moved = tmp_path / "a-moved.zarr"
    shutil.copytree(a, moved)
    shutil.move(str(a), tmp_path / "elsewhere.zarr")
    try:
        evaluate(pred, b)
        assert "is not the scene" in capfd.readouterr().err
        evaluate(pred, moved)  # the same scene, moved: no note
        assert "note" not in capfd.readouterr().err
    finally:
        shutil.move(str(tmp_path / "elsewhere.zarr"), a)


def test_the_same_scene_or_one_that_cannot_be_compared_gets_no_note(scenes, capfd, tmp_path):
    pred, a = scenes["pred"], scenes["a"]
    evaluate(pred, a)
    assert capfd.readouterr().err == ""
    again = write(labelled_scene(SIZE, SIZE, seed=0), tmp_path / "again.zarr")  # re-ingested: the same digest
    evaluate(pred, again)
    assert capfd.readouterr().err == ""
    # in another chunk layout: its statistics sum in another order, so its digest differs in the last bits
    for chunk, shard in ((16, None), (16, 32)):
        evaluate(pred, write_scene(labelled_scene(SIZE, SIZE, seed=0), tmp_path / f"layout-{chunk}-{shard}.zarr", chunk=chunk, shard=shard))
        assert capfd.readouterr().err == "", (chunk, shard)
    # labels with only one of the modalities the model read (tilefuse writes no store without one): nothing to
    # compare the digest with, so no note, whatever its scene
    sar_only = labelled_scene(SIZE, SIZE, seed=1).drop_vars("optical")
    evaluate(pred, write_scene(sar_only, tmp_path / "sar-only.zarr", chunk=64, shard=None))
    assert capfd.readouterr().err == ""
    # the note is new, and it fires for another scene: this test fails where it never fires
    evaluate(pred, scenes["b"])
    assert "is not the scene" in capfd.readouterr().err


# 3. export to a full filesystem: tilefuse's line only, not libtiff's before it


def _fill(folder: Path, leave: int) -> None:
    free = shutil.disk_usage(folder).free
    (folder / "fill").write_bytes(b"\0" * max(0, free - leave))


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 40 kB tmpfs left with a few kB free (root only; skipped elsewhere), unmounted after the test."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        _fill(mount, 12 << 10)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _libtiff_handlers() -> list:
    from tilefuse.pipelines.export import _loaded_libtiffs

    handlers = []
    for lib in _loaded_libtiffs():
        handlers.append(lib.TIFFSetErrorHandler(None))
        lib.TIFFSetErrorHandler(handlers[-1])
    return handlers


def test_export_to_a_full_disk_is_tilefuse_line_only(scenes, full_tmpfs, capfd):
    before = _libtiff_handlers()
    assert before and all(before)  # libtiff's own handler, which prints
    with pytest.raises(InputError, match=r"^cannot write .*o\.tif: No space left on device: choose another output"):
        export(scenes["pred"], full_tmpfs / "o.tif", progress=False)
    assert capfd.readouterr().err == ""  # libtiff printed '_tiffSeekProc: No space left on device.' (fd 2)
    assert sorted(p.name for p in full_tmpfs.iterdir()) == ["fill"]
    assert _libtiff_handlers() == before  # put back
    export(scenes["pred"], full_tmpfs.parent / "o.tif", progress=False)
    assert capfd.readouterr().err == "" and _libtiff_handlers() == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_export_past_a_file_size_limit_is_one_line(scenes, tmp_path):
    """The same without root: a file size limit (RLIMIT_FSIZE) makes libtiff's writes fail (EFBIG)."""
    script = (
        "import resource, signal, sys\n"
        "from tilefuse.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, "export", str(scenes["pred"]), str(tmp_path / "o.tif")],
        capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("export:")]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("tilefuse: error: cannot write"), done.stderr
    assert not (tmp_path / "o.tif").exists()


# 4. evaluate --subset: what it accepts, said and checked


def test_subset_lists_and_checks_what_it_accepts(scenes, capsys, monkeypatch, tmp_path):
    """`--subset ""` was read as test, and the help left train out."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["evaluate", "--help"]) == 0
    assert "train, val or test (default: test)" in capsys.readouterr().out
    run = tmp_path / "run"  # never read: the value is refused first
    for bad in ("", "bogus", "Test"):
        with pytest.raises(InputError, match=r"^subset= \(--subset\) must be one of train, val, test, got '.*'$"):
            evaluate(scenes["pred"], scenes["a"], split=run, subset=bad)
    with pytest.raises(InputError, match=r"must be one of train, val, test, got <xarray\.Dataset> [^\n]*$"):
        evaluate(scenes["pred"], scenes["a"], split=run, subset=tilefuse.open_scene(scenes["a"]))
    for argv in (["--subset", "", "--split", str(run)], ["--subset", ""]):  # an empty value: named before anything
        assert main(["evaluate", str(scenes["pred"]), "--labels", str(scenes["a"]), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--subset is given an empty value" in err, err
    assert np.isfinite(evaluate(scenes["pred"], scenes["a"])["kappa"])
