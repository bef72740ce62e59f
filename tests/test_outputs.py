"""The guarded writer (tilefuse.outputs) through every command: inputs never touched, overwrite only of
tilefuse's own output of the same kind, one writer per output, stale temporaries, broken filesystems."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fs_fixtures import tmpfs

from tilefuse import outputs
from tilefuse.cli import main
from tilefuse.errors import InputError
from tilefuse.outputs import found_kind, output_lock, temporary_sibling

TESTS = Path(__file__).resolve().parent


def cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_error(err: str) -> bool:
    """stderr ends with the one error line, and no other line is an error (progress bars may precede it)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    return bool(lines) and lines[-1].startswith("tilefuse: error: ") and len(errors) == 1


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) with a hash of its bytes ("dir" for folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            out[rel] = "link" if os.path.islink(path) else hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


TRAIN = ["--model", "test-pointwise", "--steps", "1", "--batch-size", "2", "--patch-size", "32", "--workers", "0",
         "--val-fraction", "0", "--quiet"]  # fmt: skip
PREDICT = ["--tile", "32", "--overlap", "8", "--block-size", "64", "--batch-size", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One output of every kind, each made by its command: GeoTIFFs, a scene, a run, a prediction, PNG, COG, JSON."""
    import predict_fixtures  # noqa: F401  (registers test-pointwise)

    root = tmp_path_factory.mktemp("world")
    w = {name: root / name for name in ("g", "s.zarr", "i.zarr", "run", "pred.zarr", "q.png", "pred.tif", "m.json")}
    assert main(["synth", str(w["s.zarr"]), "--size", "96", "--geotiff", str(w["g"])]) == 0
    assert main(["ingest", str(w["i.zarr"]), "-m", f"sar={w['g']}/sar.tif", "--labels", f"{w['g']}/label.tif"]) == 0
    assert main(["train", *TRAIN, "--store", str(w["s.zarr"]), "--out", str(w["run"])]) == 0
    args = ["predict", "--checkpoint", w["run"], "--store", w["s.zarr"], "--out", w["pred.zarr"], *PREDICT]
    assert main([str(a) for a in args]) == 0
    assert main(["info", str(w["s.zarr"]), "--quicklook", str(w["q.png"])]) == 0
    assert main(["export", str(w["pred.zarr"]), str(w["pred.tif"])]) == 0
    assert main(["evaluate", str(w["pred.zarr"]), "--labels", str(w["s.zarr"]), "--out", str(w["m.json"])]) == 0
    return root, w


def test_every_output_carries_the_marker_of_its_kind(world):
    root, w = world
    kinds = {"g": "geotiff-folder", "s.zarr": "scene", "i.zarr": "scene", "run": "run", "pred.zarr": "prediction",
             "q.png": "png", "pred.tif": "geotiff", "m.json": "json"}  # fmt: skip
    assert {name: found_kind(path) for name, path in w.items()} == kinds
    # inner files of our outputs and look-alikes are not outputs
    assert found_kind(w["g"] / "sar.tif") == "raster"  # each GeoTIFF is tagged too, as a scene's input raster
    assert found_kind(w["run"] / "config.json") is None and found_kind(w["s.zarr"] / "sar") is None
    assert found_kind(root / "missing") is None


def _input_cases(w: dict[str, Path], root: Path, link: Path) -> dict[str, list]:
    """Each output flag of each command pointed at one of that command's inputs (or around/inside it)."""
    g, s, run, pred = w["g"], w["s.zarr"], w["run"], w["pred.zarr"]
    ingest = ["-m", f"sar={g}/sar.tif", "--labels", f"{g}/label.tif", "--overwrite"]
    predict = ["predict", "--checkpoint", run, "--store", s, *PREDICT, "--overwrite"]
    return {
        "ingest onto an input raster": ["ingest", g / "sar.tif", *ingest],
        "ingest onto the folder holding the rasters": ["ingest", g, *ingest],
        "ingest onto the folder, trailing slash": ["ingest", f"{g}/", *ingest],
        "ingest onto the folder, via ..": ["ingest", g / ".." / "g", *ingest],
        "ingest onto the folder, relative": ["ingest", "g", *ingest],
        "ingest onto a parent of the inputs": ["ingest", root, *ingest],
        "ingest inside the input folder's raster": ["ingest", g / "sar.tif" / "x.zarr", *ingest],
        "info quicklook onto its store": ["info", s, "--quicklook", s],
        "info quicklook inside its store": ["info", s, "--quicklook", s / "q.png"],
        "info quicklook via a symlink to its store": ["info", s, "--quicklook", link],
        "train onto its store": ["train", *TRAIN, "--store", s, "--out", s, "--overwrite"],
        "train onto its store via a symlink": ["train", *TRAIN, "--store", s, "--out", link, "--overwrite"],
        "train inside its store": ["train", *TRAIN, "--store", s, "--out", s / "run"],
        "train around its store": ["train", *TRAIN, "--store", s, "--out", root, "--overwrite"],
        "predict onto its store": [*predict, "--out", s],
        "predict onto its store, relative": [*predict, "--out", "s.zarr"],
        "predict onto its checkpoint": [*predict, "--out", run],
        "predict inside its checkpoint": [*predict, "--out", run / "p.zarr"],
        "predict quicklook onto its store": [*predict, "--out", root / "p2.zarr", "--quicklook", s],
        "predict quicklook inside its own output": [*predict, "--out", root / "p3.zarr", "--quicklook", root / "p3.zarr" / "q.png"],
        "evaluate json onto its prediction": ["evaluate", pred, "--labels", s, "--out", pred],
        "evaluate json inside its labels": ["evaluate", pred, "--labels", s, "--out", s / "m.json"],
        "export onto its prediction": ["export", pred, pred, "--overwrite"],
        "export inside its prediction": ["export", pred, pred / "x.tif", "--overwrite"],
        "synth geotiff folder inside its own store": ["synth", root / "n.zarr", "--size", "32", "--geotiff", root / "n.zarr"],
    }


CASES = sorted(_input_cases({k: Path(k) for k in ("g", "s.zarr", "run", "pred.zarr")}, Path("r"), Path("l")))


@pytest.mark.parametrize("case", CASES)
def test_output_pointed_at_an_input_is_refused_and_inputs_stay_byte_identical(case, world, capsys, monkeypatch):
    root, w = world
    link = root.parent / f"{root.name}-link"
    if not link.is_symlink():
        link.symlink_to(w["s.zarr"])
    monkeypatch.chdir(root)
    before = tree(root)
    code, err = cli(_input_cases(w, root, link)[case], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tilefuse: error: ") and "Traceback" not in err, err
    assert tree(root) == before


def test_overwrite_replaces_only_an_output_of_the_same_kind(world, tmp_path, capsys):
    root, w = world
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"mine")
    foreign_json = tmp_path / "foreign.json"
    foreign_json.write_text('{"mine": 1}')
    scene = tmp_path / "scene.zarr"
    shutil.copytree(w["i.zarr"], scene)
    g, s, run, pred = w["g"], w["s.zarr"], w["run"], w["pred.zarr"]
    ingest = ["-m", f"sar={g}/sar.tif", "--overwrite"]
    predict = ["predict", "--checkpoint", run, "--store", s, *PREDICT, "--overwrite"]
    refused = {
        "ingest onto a folder": ["ingest", folder, *ingest],
        "ingest onto a file": ["ingest", foreign, *ingest],
        "synth --geotiff onto a foreign folder": ["synth", tmp_path / "x.zarr", "--size", "32", "--overwrite", "--geotiff", folder],
        "synth --geotiff onto a file": ["synth", tmp_path / "y.zarr", "--size", "32", "--geotiff", foreign],
        "train onto a scene store": ["train", *TRAIN, "--store", s, "--out", scene, "--overwrite"],
        "train onto a folder": ["train", *TRAIN, "--store", s, "--out", folder, "--overwrite"],
        "predict onto a scene store": [*predict, "--out", scene],
        "predict onto a file": [*predict, "--out", foreign],
        "predict quicklook onto a file": [*predict, "--out", tmp_path / "p.zarr", "--quicklook", foreign],
        "info quicklook onto a file": ["info", s, "--quicklook", foreign],
        "info quicklook onto a scene store": ["info", s, "--quicklook", scene],
        "evaluate json onto a foreign json": ["evaluate", pred, "--labels", s, "--out", foreign_json],
        "evaluate json onto a folder": ["evaluate", pred, "--labels", s, "--out", folder],
        "export onto a scene store": ["export", pred, scene, "--overwrite"],
        "export onto a file": ["export", pred, foreign, "--overwrite"],
        "demo into a foreign folder": ["demo", folder, "--size", "64", "--steps", "1"],
    }
    before = tree(tmp_path)
    for case, args in refused.items():
        code, err = cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (case, err)
        assert tree(tmp_path) == before, case
    # the same kind, written by tilefuse, is replaced
    assert cli(["ingest", scene, *ingest], capsys)[0] == 0 and found_kind(scene) == "scene"
    assert cli(["synth", tmp_path / "g2.zarr", "--size", "32", "--geotiff", tmp_path / "g2"], capsys)[0] == 0
    assert cli(["synth", tmp_path / "g2.zarr", "--size", "32", "--geotiff", tmp_path / "g2", "--overwrite"], capsys)[0] == 0
    assert cli([*predict, "--out", tmp_path / "p.zarr", "--quicklook", tmp_path / "p.png"], capsys)[0] == 0
    assert cli([*predict, "--out", tmp_path / "p.zarr", "--quicklook", tmp_path / "p.png"], capsys)[0] == 0
    assert cli(["export", tmp_path / "p.zarr", tmp_path / "p.tif"], capsys)[0] == 0
    assert cli(["export", tmp_path / "p.zarr", tmp_path / "p.tif"], capsys)[0] == 2  # without --overwrite
    assert cli(["export", tmp_path / "p.zarr", tmp_path / "p.tif", "--overwrite"], capsys)[0] == 0
    for _ in range(2):
        assert cli(["evaluate", tmp_path / "p.zarr", "--labels", s, "--out", tmp_path / "m.json"], capsys)[0] == 0
        assert cli(["info", s, "--quicklook", tmp_path / "q.png"], capsys)[0] == 0
    assert json.loads((tmp_path / "m.json").read_text())["overall_accuracy"] >= 0
    assert cli(["train", *TRAIN, "--store", s, "--out", tmp_path / "run"], capsys)[0] == 0
    assert cli(["train", *TRAIN, "--store", s, "--out", tmp_path / "run", "--overwrite"], capsys)[0] == 0
    assert not [p for p in tmp_path.iterdir() if outputs.is_temporary(p) or p.name.endswith(".lock")]


def test_overwriting_a_geotiff_folder_never_deletes_a_tiff_it_did_not_write(world, tmp_path, capsys):
    """A GeoTIFF folder counted every tilefuse-marked GeoTIFF in it as its own: `synth --geotiff DIR
    --overwrite` deleted a COG that `export` had written into DIR, and a user's copy of one of its files."""
    _, w = world
    g = tmp_path / "g"
    synth = ["synth", tmp_path / "g.zarr", "--size", "32", "--geotiff", g, "--overwrite"]
    assert cli(synth, capsys)[0] == 0
    for extra in ("export", "copy"):
        if extra == "export":
            assert cli(["export", w["pred.zarr"], g / "prediction.tif"], capsys)[0] == 0
            added = g / "prediction.tif"
        else:
            added = g / "sar_copy.tif"
            shutil.copyfile(g / "sar.tif", added)
        before = tree(tmp_path)
        code, err = cli(synth, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and added.name in err, err
        assert tree(tmp_path) == before
        added.unlink()
    (g / "sar.tif.aux.xml").write_text("<PAMDataset/>")  # GDAL's sidecar of one of its files is its own
    assert cli(synth, capsys)[0] == 0 and sorted(p.name for p in g.iterdir() if not p.name.startswith(".")) == [
        "label.tif", "optical.tif", "sar.tif"]


def test_a_scene_raster_synth_wrote_is_never_replaced_by_an_export_even_copied_out_of_its_folder(world, tmp_path, capsys):
    """synth's rasters and export's COGs carried the same marker: a copy of synth's optical.tif moved out of its
    GeoTIFF folder was 'a COG tilefuse wrote', and `export --overwrite` replaced the 6-band raster by a label map."""
    _, w = world
    g = tmp_path / "g"
    assert cli(["synth", tmp_path / "g.zarr", "--size", "32", "--geotiff", g], capsys)[0] == 0
    for name in ("optical.tif", "sar.tif", "label.tif"):
        copy = tmp_path / f"mine_{name}"
        shutil.copyfile(g / name, copy)
        before = hashlib.sha256(copy.read_bytes()).hexdigest()
        code, err = cli(["export", w["pred.zarr"], copy, "--overwrite"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "synth wrote" in err, err
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == before
    assert cli(["export", w["pred.zarr"], tmp_path / "e.tif"], capsys)[0] == 0  # an export still replaces an export
    assert cli(["export", w["pred.zarr"], tmp_path / "e.tif", "--overwrite"], capsys)[0] == 0


def test_evaluate_out_creates_missing_folders_and_synth_geotiff_onto_a_file_is_refused(world, tmp_path, capsys):
    _, w = world
    out = tmp_path / "missing" / "dir" / "m.json"
    assert cli(["evaluate", w["pred.zarr"], "--labels", w["s.zarr"], "--out", out], capsys)[0] == 0
    assert found_kind(out) == "json"
    (tmp_path / "file").write_text("x")
    code, err = cli(["evaluate", w["pred.zarr"], "--labels", w["s.zarr"], "--out", tmp_path / "file" / "m.json"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    code, err = cli(["synth", tmp_path / "s.zarr", "--size", "32", "--geotiff", tmp_path / "file"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and (tmp_path / "file").read_text() == "x", err
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------- locks


def _hold_lock(path: Path) -> subprocess.Popen:
    """A process holding the lock of output ``path`` until it is killed."""
    code = "import sys, time; from tilefuse.outputs import output_lock\nwith output_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)"
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(world, tmp_path, capsys):
    _, w = world
    out = tmp_path / "labels.tif"
    holder = _hold_lock(out)
    try:
        code, err = cli(["export", w["pred.zarr"], out], capsys)
        assert code == 2 and f"process {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert outputs.lock_path(out).exists(), "a killed writer leaves its lock"
    assert cli(["export", w["pred.zarr"], out], capsys)[0] == 0, "a dead writer's lock is taken over"
    assert not outputs.lock_path(out).exists()
    # a lock naming this very pid but another start time (the pid was reused) is stale too
    outputs.lock_path(out).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": 1.0}))
    assert cli(["export", w["pred.zarr"], out, "--overwrite"], capsys)[0] == 0
    # an empty lock (made, never written) is taken over once it is old (see the test below); a live holder on
    # another host is refused
    outputs.lock_path(out).write_text("")
    past = time.time() - 2 * outputs.UNREADABLE_GRACE
    os.utime(outputs.lock_path(out), (past, past))
    with output_lock(out):
        pass
    outputs.lock_path(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": 1.0}))
    with pytest.raises(InputError, match="process 1 on elsewhere"):
        with output_lock(out):
            pass
    outputs.lock_path(out).unlink()


def test_a_lock_never_exists_without_its_record(tmp_path):
    """A second writer that found the lock empty took it over as unreadable while its creator was about to write
    it: two writers. The lock is now written first and linked into place, so a reader finds it whole or absent."""
    out, lock = tmp_path / "pred.zarr", outputs.lock_path(tmp_path / "pred.zarr")
    partial, whole, stop = [], [], threading.Event()

    def read():
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                text = lock.read_text()
                try:
                    whole.append(json.loads(text)["pid"])
                except ValueError:
                    partial.append(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(2000):
            with output_lock(out):
                pass
    finally:
        stop.set()
        reader.join()
    assert not partial, f"{len(partial)} reads found the lock without its record"
    assert whole and set(whole) == {os.getpid()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no lock or temporary left behind"


def test_a_young_unreadable_lock_is_waited_on_and_an_old_one_taken_over(tmp_path, monkeypatch):
    """Without hard links (or from an earlier release) a lock is created empty and written just after: a young
    unreadable lock is re-read until it is UNREADABLE_GRACE seconds old, an old one counts as damaged."""
    monkeypatch.setattr(outputs, "UNREADABLE_GRACE", 0.6)
    out = tmp_path / "pred.zarr"
    lock = outputs.lock_path(out)
    lock.write_text("")
    pid, start = outputs.current_process()
    writer = threading.Timer(0.2, lambda: lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": start})))
    writer.start()
    try:
        with pytest.raises(InputError, match=f"being written by process {pid}"):
            with output_lock(out):
                pass
    finally:
        writer.join()
    lock.write_text("")
    past = time.time() - 1.0
    os.utime(lock, (past, past))
    began = time.monotonic()
    with output_lock(out):
        assert json.loads(lock.read_text())["pid"] == pid
    assert time.monotonic() - began < 0.5 and not lock.exists()


def test_a_lock_is_made_on_a_filesystem_without_hard_links(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", refuse)
    out = tmp_path / "pred.zarr"
    with output_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert [p.name for p in tmp_path.iterdir()] == [lock.name], "the record's temporary is removed"
        assert outputs.live_writer(out) == f"process {os.getpid()}"
    assert not lock.exists()


def test_an_interrupt_as_the_lock_appears_leaves_no_lock(tmp_path, monkeypatch):
    """Ctrl-C just after the lock was made and before the block that releases it began left the lock."""

    def interrupted(lock):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "_remove_dead_lock_copies", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with output_lock(tmp_path / "pred.zarr"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_copies_of_a_lock_left_by_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    """A writer killed between writing its lock's record and linking it into place (``.new-``), or between
    moving a dead writer's lock aside and removing it (``.stale-``), left that copy for ever."""
    out = tmp_path / "pred.zarr"
    lock = outputs.lock_path(out)
    record = {"pid": os.getpid(), "host": outputs._host(), "start": outputs.current_process()[1], "output": str(out)}
    dead = {**record, "pid": _dead_pid()}
    copies = {
        "new-0a0a0a": (dead, 0), "stale-0b0b0b": (dead, 0), "new-0c0c0c": (None, 10),  # removed
        "new-1a1a1a": (record, 0), "stale-1b1b1b": ({**dead, "host": "elsewhere"}, 0), "new-1c1c1c": (None, 0),  # kept
    }
    for suffix, (content, age) in copies.items():
        path = lock.with_name(f"{lock.name}.{suffix}")
        path.write_text("" if content is None else json.dumps(content))
        os.utime(path, (time.time() - age,) * 2)
    with output_lock(out):
        pass
    left = sorted(p.name[len(lock.name) + 1 :] for p in tmp_path.iterdir())
    assert left == ["new-1a1a1a", "new-1c1c1c", "stale-1b1b1b"]


@pytest.mark.parametrize("command", ["train", "ingest"])
def test_a_writer_holds_its_lock_for_the_whole_run(command, world, tmp_path, capsys, monkeypatch):
    """While train / ingest run, their output's lock exists and names this process; afterwards it is gone."""
    _, w = world
    out = tmp_path / "out"
    seen = []
    if command == "train":
        import tilefuse.training

        real = tilefuse.training.fit

        def spy(*args, **kwargs):
            seen.append(json.loads(outputs.lock_path(out).read_text())["pid"])
            return real(*args, **kwargs)

        monkeypatch.setattr(tilefuse.training, "fit", spy)
        args = ["train", *TRAIN, "--store", w["s.zarr"], "--out", out]
    else:
        import dask

        real = dask.compute

        def spy(*args, **kwargs):
            if outputs.lock_path(out).exists():
                seen.append(json.loads(outputs.lock_path(out).read_text())["pid"])
            return real(*args, **kwargs)

        monkeypatch.setattr(dask, "compute", spy)
        args = ["ingest", out, "-m", f"sar={w['g']}/sar.tif"]
    assert cli(args, capsys)[0] == 0
    assert seen and set(seen) == {os.getpid()}
    assert not outputs.lock_path(out).exists()


@pytest.mark.slow
def test_two_concurrent_predicts_on_one_output(tmp_path, capsys):
    """A second predict while the first runs is refused; once the first is killed, a third takes over."""
    from predict_fixtures import save_pointwise, write_test_scene

    scene = write_test_scene(tmp_path / "scene.zarr", 128, 128, seed=1)
    slow = save_pointwise(tmp_path / "slow", delay=0.5)
    other = save_pointwise(tmp_path / "other", seed=3)
    out = tmp_path / "pred.zarr"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import predict_fixtures, tilefuse\n"
        "tilefuse.predict(sys.argv[2], sys.argv[3], sys.argv[4], tile=32, overlap=8, block_size=64, batch_size=2, progress=False)"
    )
    first = subprocess.Popen([sys.executable, "-c", code, str(TESTS), str(slow), str(scene), str(out)])
    try:
        deadline = time.time() + 120
        while not (out.exists() and outputs.lock_path(out).exists()) and time.time() < deadline:
            time.sleep(0.05)
        assert out.exists(), "the first predict did not start"
        args = ["predict", "--checkpoint", other, "--store", scene, "--out", out, *PREDICT, "--overwrite"]
        code_, err = cli(args, capsys)
        assert code_ == 2 and f"process {first.pid}" in err, err
        assert cli(["predict", "--checkpoint", slow, "--store", scene, "--out", out, *PREDICT, "--resume"], capsys)[0] == 2
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert cli(args, capsys)[0] == 0, "the dead predict's lock is taken over"
    from tilefuse.prediction import prediction_attrs

    assert prediction_attrs(out)["complete"] is True


# ------------------------------------------------------------------- temporaries


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_are_cleaned_and_never_opened(world, tmp_path, capsys):
    _, w = world
    out = tmp_path / "s.zarr"
    mine = temporary_sibling(out)
    dead = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    other_host = mine.with_name(mine.name.replace(mine.name.split(".tmp-")[1][:6], "ffffff" if "ffffff" not in mine.name else "eeeeee"))
    for tmp in (mine, dead, other_host):
        shutil.copytree(w["s.zarr"], tmp)  # looks like a whole store
    with pytest.raises(InputError, match="temporary"):
        from tilefuse.scene import open_scene

        open_scene(dead)
    assert cli(["ingest", out, "-m", f"sar={w['g']}/sar.tif"], capsys)[0] == 0
    assert not dead.exists(), "a dead run's temporary is removed"
    assert mine.exists() and other_host.exists(), "a live run's (or another host's) temporary is kept"
    # a kill between moving the old output aside and renaming the new one: the old one comes back
    aside = dead.with_name(dead.name.replace(".tmp-", ".old-"))
    os.replace(out, aside)
    assert outputs.clean_stale(out) == [] and found_kind(out) == "scene" and not aside.exists()


# --------------------------------------------------------------- broken filesystems


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs (root only), unmounted afterwards."""
    with tmpfs(tmp_path / "mnt", "512k") as mount:
        yield mount


def _outputs_look_complete(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if found_kind(p) is not None or not p.name.startswith(".")]


def test_read_only_filesystem_is_one_line(small_tmpfs, world, capsys):
    _, w = world
    if subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)]).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    commands = [
        ["synth", small_tmpfs / "s.zarr", "--size", "32"],
        ["ingest", small_tmpfs / "i.zarr", "-m", f"sar={w['g']}/sar.tif"],
        ["info", w["s.zarr"], "--quicklook", small_tmpfs / "q.png"],
        ["train", *TRAIN, "--store", w["s.zarr"], "--out", small_tmpfs / "run"],
        ["predict", "--checkpoint", w["run"], "--store", w["s.zarr"], "--out", small_tmpfs / "p.zarr", *PREDICT],
        ["evaluate", w["pred.zarr"], "--labels", w["s.zarr"], "--out", small_tmpfs / "m.json"],
        ["export", w["pred.zarr"], small_tmpfs / "p.tif"],
        ["synth", small_tmpfs.parent / "ok.zarr", "--size", "32", "--geotiff", small_tmpfs / "g"],
    ]
    for args in commands:
        code, err = cli(args, capsys)
        assert code == 2 and one_error(err), (args, err)
        assert "cannot write" in err and "read-only" in err.lower(), err
    assert list(small_tmpfs.iterdir()) == []


def test_full_filesystem_is_one_line_and_leaves_nothing_complete(small_tmpfs, capsys):
    g = small_tmpfs.parent / "g"
    assert main(["synth", str(small_tmpfs.parent / "g.zarr"), "--size", "256", "--geotiff", str(g)]) == 0
    (small_tmpfs / "filler").write_bytes(os.urandom(200 << 10))
    commands = [
        ["synth", small_tmpfs / "s.zarr", "--size", "256"],  # refused by the free-space estimate or by ENOSPC
        ["ingest", small_tmpfs / "i.zarr", "-m", f"sar={g}/sar.tif", "-m", f"optical={g}/optical.tif"],
        ["ingest", small_tmpfs / "i.zarr", "-m", f"sar={g}/sar.tif", "-m", f"optical={g}/optical.tif", "--allow-large"],
        ["synth", small_tmpfs.parent / "ok.zarr", "--size", "256", "--geotiff", small_tmpfs / "g"],
    ]
    for args in commands:
        code, err = cli(args, capsys)
        assert code == 2 and one_error(err), (args, err)
        assert " free" in err or "No space left" in err, err
        assert _outputs_look_complete(small_tmpfs) == ["filler"], list(small_tmpfs.iterdir())
    assert not [p for p in small_tmpfs.iterdir() if p.name.startswith(".")], "temporaries left"


def test_os_errors_that_escape_a_command_are_one_line(monkeypatch, capsys):
    import tilefuse.pipelines.info

    def fail(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/somewhere/out.png")

    monkeypatch.setattr(tilefuse.pipelines.info, "info", fail)
    code, err = cli(["info", "x.zarr"], capsys)
    assert code == 2 and err.strip() == (
        "tilefuse: error: cannot write /somewhere/out.png: Read-only file system: "
        "choose another output (a writable folder with enough free space) or fix its permissions"
    )

    def bug(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(tilefuse.pipelines.info, "info", bug)
    with pytest.raises(OSError):
        main(["info", "x.zarr"])


def test_inputs_overlap_whatever_the_spelling(tmp_path, monkeypatch):
    """Every pair of spellings: refused exactly when one real location is, or holds, the other."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "a")
    (tmp_path / "c" / "lb").symlink_to(tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path / "c")
    where = {  # spelling -> location in the tree, by hand
        "../a": ("a",), f"{tmp_path}/a/": ("a",), "../a/../a": ("a",), "../l": ("a",), f"{tmp_path}/l/b": ("a", "b"),
        "lb": ("a", "b"), "lb/new.zarr": ("a", "b", "new.zarr"), ".": ("c",), "new.zarr": ("c", "new.zarr"),
        "..": (), "../a/b/..": ("a",), "../c/lb/../x": ("a", "x"),
    }  # fmt: skip
    for out, place in where.items():
        for source, other in where.items():
            overlap = place[: len(other)] == other or other[: len(place)] == place
            try:
                outputs.check_inputs(out, [source])
                refused = False
            except InputError:
                refused = True
            assert refused == overlap, (out, source)


@contextlib.contextmanager
def held_by_another_thread(out):
    """The lock of ``out`` held by a writer thread of this process for the block."""
    held, release = threading.Event(), threading.Event()

    def writer():
        with output_lock(out):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        thread.join()


def test_locks_nest_in_one_thread_and_exclude_other_threads(tmp_path):
    out = tmp_path / "x.zarr"
    with output_lock(out), output_lock(out):  # a pipeline's lock, then the store writer's own
        assert outputs.lock_path(out).exists()
    assert not outputs.lock_path(out).exists()
    with held_by_another_thread(out):
        with pytest.raises(InputError, match=f"process {os.getpid()}"):
            with output_lock(out):
                pass
    with output_lock(out):
        pass


def test_disk_filling_up_while_blocks_are_written_is_one_line(small_tmpfs, tmp_path, capsys):
    """The store is created (it fits), then its blocks fill the disk: one line, exit 2, the store not complete."""
    from predict_fixtures import save_pointwise, write_test_scene

    from tilefuse.prediction import prediction_attrs

    scene = write_test_scene(tmp_path / "scene.zarr", 384, 384, seed=2)
    checkpoint = save_pointwise(tmp_path / "ckpt")
    out = small_tmpfs / "p.zarr"
    args = ["predict", "--checkpoint", checkpoint, "--store", scene, "--out", out, "--probs", "--probs-dtype", "float32",
            "--tile", "64", "--overlap", "16", "--block-size", "128"]  # fmt: skip
    code, err = cli(args, capsys)
    assert code == 2 and one_error(err) and "No space left" in err, err
    assert not out.exists() or prediction_attrs(out)["complete"] is False
    assert not outputs.lock_path(out).exists()


@pytest.mark.parametrize("name", ["g", "s.zarr", "run", "pred.zarr"])
def test_overwrite_never_deletes_what_a_user_put_inside_an_output(world, tmp_path, capsys, name):
    """Replacing a folder output deletes the folder: one holding anything tilefuse does not write there
    (a file, a folder, another tilefuse store) is refused whole, for every folder and store kind, and an
    output holding only its own entries is still replaced."""
    root, w = world
    g, s = w["g"], w["s.zarr"]
    commands = {
        "g": ["synth", tmp_path / "x.zarr", "--size", "32", "--geotiff", tmp_path / name, "--overwrite"],
        "s.zarr": ["ingest", tmp_path / name, "-m", f"sar={g}/sar.tif", "--overwrite"],
        "run": ["train", *TRAIN, "--store", s, "--out", tmp_path / name, "--overwrite"],
        "pred.zarr": ["predict", "--checkpoint", w["run"], "--store", s, "--out", tmp_path / name, *PREDICT, "--overwrite"],
    }
    kind = found_kind(w[name])
    for extra in ("notes.txt", "mine", "nested.zarr", ".hidden"):
        out = tmp_path / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp_path / "x.zarr", ignore_errors=True)
        shutil.copytree(w[name], out)
        if extra == "nested.zarr":
            shutil.copytree(w["i.zarr"], out / extra)  # a store the user wrote inside it
        elif extra == "mine":
            (out / extra).mkdir()
            (out / extra / "data.bin").write_bytes(b"mine")
        else:
            (out / extra).write_text("mine")
        before = tree(tmp_path)
        code, err = cli(commands[name], capsys)
        assert code == 2 and one_error(err) and extra in err and "move it out" in err, (name, extra, err)
        assert tree(tmp_path) == before, (name, extra)
        with pytest.raises(InputError, match=extra.replace(".", r"\.")):
            outputs.claim(out, kind, overwrite=True)
        assert outputs.claim(out, kind, exist_ok=True) == out.resolve()  # a resume deletes nothing: allowed
    (out / extra).unlink()  # the last one is a file
    assert cli(commands[name], capsys)[0] == 0 and found_kind(out) == kind


def test_a_live_writer_stays_live_when_the_wall_clock_is_set(tmp_path, monkeypatch):
    """The boot time Linux reports (wall clock minus uptime) moves when the clock is set (NTP, a virtual machine
    restored from a snapshot); a live writer must not look dead then, or its lock and temporaries are taken."""
    import psutil

    out = tmp_path / "x.zarr"
    mine = temporary_sibling(out)
    mine.mkdir()
    dead = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-"))
    dead.mkdir()
    with held_by_another_thread(out):
        booted = psutil.boot_time()
        for shift in (-7.0, 3600.0):  # the clock set back a little, then forward by an hour
            if sys.platform.startswith("linux"):
                monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: booted + shift)
            monkeypatch.setattr(psutil, "boot_time", lambda: booted + shift)
            assert outputs.live_writer(out) == f"process {os.getpid()}"
            with pytest.raises(InputError, match=f"process {os.getpid()}"):
                with output_lock(out):
                    pass
            outputs.clean_stale(out)
            assert mine.exists() and not dead.exists(), "a live run's temporary is kept, a dead run's removed"
            assert outputs.process_alive(*outputs.current_process())


def test_a_process_that_may_not_be_inspected_counts_as_alive(monkeypatch):
    """Another user's process, where /proc hides it, cannot be read but answers signal 0 with EPERM."""
    pid = _dead_pid()
    assert not outputs.process_alive(pid, 123.0)

    def kill(target, signal_):
        if target == pid and signal_ == 0:
            raise PermissionError(1, "Operation not permitted")
        raise AssertionError("only signal 0 is sent")

    monkeypatch.setattr(os, "kill", kill)
    assert outputs.process_alive(pid, 123.0) and outputs.process_alive(pid, None)


def test_a_lock_written_with_a_wall_clock_start_still_names_its_live_writer(tmp_path):
    """Locks written before start times were counted from boot hold wall-clock seconds since 1970: a run of
    the earlier release that is still writing is not taken over by this one."""
    import psutil

    out = tmp_path / "x.zarr"
    lock = outputs.lock_path(out)
    started = round(psutil.Process().create_time(), 2)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "start": started, "output": str(out)}
    lock.write_text(json.dumps(record))
    with pytest.raises(InputError, match=f"process {os.getpid()}"):
        with output_lock(out):
            pass
    lock.write_text(json.dumps({**record, "pid": _dead_pid()}))
    with output_lock(out):  # a dead writer's lock of either kind is taken over
        assert json.loads(lock.read_text())["start"] == outputs.current_process()[1]


@pytest.mark.parametrize("inside", ["state/notes.txt", "index/mine.npz", "index/pred.zarr"])
def test_train_overwrite_never_deletes_what_a_user_put_inside_the_run_state_or_index(tmp_path, capsys, inside):
    """Only the top of a run folder was looked at: a user's notes in RUN/state, or a store written into RUN/index,
    went with the run on `train --overwrite`; and a resume deleted any .npz in RUN/index it did not use."""
    store = tmp_path / "s.zarr"
    assert main(["synth", str(store), "--size", "64"]) == 0
    run = tmp_path / "run"
    train = ["train", "--model", "pad", "--hparam", "preset=micro", "--store", str(store), "--out", str(run), "--steps", "1",
             "--batch-size", "2", "--patch-size", "32", "--workers", "0", "--val-fraction", "0", "--quiet"]  # fmt: skip
    assert main(train) == 0
    target = run / inside
    if target.suffix == ".zarr":
        shutil.copytree(store, target)
    else:
        target.write_bytes(b"mine")
    capsys.readouterr()
    assert main([*train, "--resume"]) == 0  # the run's own index is rewritten beside it
    assert target.exists()
    assert main([*train, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds {inside}" in err and "never deleted" in err, err
    assert target.exists()
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert main([*train, "--overwrite"]) == 0  # what training wrote there is its own


def test_a_sigterm_in_the_middle_of_a_folder_swap_is_taken_once_the_new_folder_is_in_place(tmp_path, monkeypatch):
    """A SIGTERM between moving the old folder aside and removing it left ``.state.old-...`` in a run folder
    (a full test run saw it once): the swap and the removal now happen whole, and the signal is taken after."""
    import signal

    from tilefuse.outputs import replace_path
    from tilefuse.signals import terminating

    dst, src = tmp_path / "out", tmp_path / ".out.new"
    for folder, text in ((dst, "old"), (src, "new")):
        folder.mkdir()
        (folder / "a").write_text(text)
    real, moves = os.replace, []

    def replace(a, b):
        real(a, b)
        moves.append(b)
        if len(moves) == 1:  # the old folder is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit), terminating():
        replace_path(src, dst)
    assert (dst / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "nothing left beside it"


@pytest.mark.parametrize("kind", ["notes", "json", "record", "folder"])
def test_a_file_or_folder_named_like_a_lock_that_tilefuse_did_not_write_is_never_removed(tmp_path, kind, capsys):
    """A user's '.scene.zarr.lock' (notes, a folder) beside the output was taken for a damaged lock once 2 s old:
    the file was deleted, the folder renamed '.scene.zarr.lock.stale-...' and left. Only an empty lock, the one
    state tilefuse itself can leave, is taken over; anything else is refused in one line and kept as it is."""
    from test_bad_input_ops import _digest

    out = tmp_path / "scene.zarr"
    lock = outputs.lock_path(out)
    if kind == "folder":
        lock.mkdir()
        (lock / "f").write_text("keep")
    else:
        lock.write_text({"notes": "my notes", "json": "[1, 2]", "record": json.dumps({"pid": "x"})}[kind])
    past = time.time() - 2 * outputs.UNREADABLE_GRACE
    os.utime(lock, (past, past))
    before = _digest(tmp_path)
    code, err = cli(["synth", out, "--size", "64"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a lock tilefuse wrote" in err and str(lock) in err, err
    assert _digest(tmp_path) == before and lock.exists() and sorted(p.name for p in tmp_path.iterdir()) == [lock.name]
    for copy in (".new-abcdef", ".stale-abcdef"):  # a copy named like one a killed writer left: kept unless empty
        (tmp_path / (lock.name + copy)).write_text("mine")
        os.utime(tmp_path / (lock.name + copy), (past, past))
    outputs._remove_dead_lock_copies(lock)
    assert (tmp_path / (lock.name + ".new-abcdef")).exists() and (tmp_path / (lock.name + ".stale-abcdef")).exists()
