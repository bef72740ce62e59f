"""Careless input to `tilefuse models | ingest | demo`: each is one line naming the problem and a fix that works,
exit status 2, nothing written and nothing replaced."""

from __future__ import annotations

import pytest
from test_careless_ingest import one_line, run_cli, tifs, tree  # noqa: F401  (tifs: a fixture)

from tilefuse.errors import InputError

# models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, words",
    [
        ("modalities={bad", ["modalities", "JSON object", "'{bad'"]),
        ("modalities=5", ["modalities", "JSON object", "got 5"]),
        ("modalities=[1]", ["modalities", "JSON object", "got [1]"]),
        ("modalities=null", ["modalities", "JSON object", "got null"]),
        ("modalities={}", ["modalities", "JSON object", "got {}"]),
        ('modalities={"optical": 3, "sar": 2.5}', ["modalities", "'sar'", "whole number >= 1", "got 2.5"]),
        ('modalities={"optical": 3, "sar": true}', ["modalities", "'sar'", "whole number >= 1", "got true"]),
        ("num_classes=NaN", ["num_classes", "whole number >= 1", "got NaN"]),
        ("num_classes=1e400", ["num_classes", "whole number >= 1", "got Infinity"]),
        ("num_classes=2.5", ["num_classes", "whole number >= 1", "got 2.5"]),
        ("num_classes=true", ["num_classes", "whole number >= 1", "got true"]),
        ("num_classes=null", ["num_classes", "whole number >= 1", "got null"]),
        ("num_classes=six", ["num_classes", "whole number >= 1", "'six'"]),
    ],
)
def test_models_set_of_the_wrong_type_is_one_line_naming_the_key(setting, words, capsys):
    """`tilefuse models pad --set modalities=5` (or '{bad', [1], num_classes=NaN, 1e400) ended in a 46-line traceback,
    exit 1; num_classes=2.5 was shown as 2 classes and num_classes=true as 1."""
    for model in ("pad", "s2fin"):
        code, out, err = run_cli(["models", model, "--set", setting], capsys)
        line = one_line(code, err, "--set")
        assert all(word in line for word in words), line
        assert out == ""


def test_models_api_refuses_the_same_settings_and_good_ones_still_count(capsys):
    from tilefuse.pipelines.models import describe_models

    for overrides in ({"num_classes": 2.5}, {"num_classes": True}, {"modalities": [("optical", 3)]}, {"modalities": {"optical": "3"}}):
        with pytest.raises(InputError, match="overrides"):
            describe_models("pad", overrides)
    import numpy as np

    (record,) = describe_models("pad", {"num_classes": np.int64(5), "modalities": {"optical": np.int32(4), "sar": 2}})
    assert record["example"]["num_classes"] == 5 and record["example"]["modalities"] == {"optical": 4, "sar": 2}
    code, out, err = run_cli(["models", "pad", "--set", "num_classes=6", "--set", 'modalities={"optical": 4, "sar": 2}'], capsys)
    assert code == 0, err
    assert "optical:4, sar:2; 6 classes" in out


# ingest: band ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bands", ["1-0", "0", "0-2", "3-0", "2,0", "00"])
def test_a_band_0_says_bands_count_from_1(bands, tifs, tmp_path, capsys):
    """`-m optical=optical.tif:1-0` said 'is reversed: write 0-1', a fix that is itself refused (band 0)."""
    before = tree(tifs["optical"].parent)
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"optical={tifs['optical']}:{bands}"], capsys)
    line = one_line(code, err, "bands count from 1")
    assert "write 0" not in line and "reversed" not in line, line
    assert list(tmp_path.iterdir()) == [] and tree(tifs["optical"].parent) == before


def test_a_reversed_range_is_fixed_only_where_the_fix_is_valid(tifs, tmp_path, capsys):
    """A reversed range was answered 'write LOW-HIGH' first, also where that range was past the raster's bands or
    gave a band twice (refused in turn); now those are said first, and the one fix suggested works."""
    optical = tifs["optical"]  # 6 bands
    for bands, pattern in (
        ("9-7", "band 7 is out of range, "),  # was 'reversed: write 7-9'
        ("1,3-1", "band 1 is given twice"),  # was 'reversed: write 1-3', which gives band 1 twice
        ("6-4,5", "band 5 is given twice"),  # was 'reversed: write 4-6', which gives band 5 twice
    ):
        code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"optical={optical}:{bands}"], capsys)
        assert "reversed" not in one_line(code, err, pattern), bands
        assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"optical={optical}:5-3"], capsys)
    assert "write 3-5" in one_line(code, err, "reversed")
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"optical={optical}:3-5"], capsys)
    assert code == 0, err


@pytest.mark.timeout(60)
def test_a_huge_band_range_is_refused_at_once(tifs, tmp_path, capsys):
    """`optical.tif:1-10000000000` was expanded band by band (each checked against all before it): it hung."""
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "-m", f"optical={tifs['optical']}:1-10000000000"], capsys)
    one_line(code, err, "band 7 is out of range, ")
    assert list(tmp_path.iterdir()) == []


def test_empty_labels_or_modality_path_names_the_parameter(tifs, tmp_path):
    """`tilefuse.ingest(out, {...}, labels='')` said 'path is empty: give the path to read', naming no parameter."""
    import tilefuse

    with pytest.raises(InputError, match=r"^labels= \(--labels\) is empty"):
        tilefuse.ingest(tmp_path / "s.zarr", {"optical": tifs["optical"]}, labels="")
    with pytest.raises(InputError, match=r"^modality 'optical' \(modalities=, --modality optical=PATH\) is an empty path"):
        tilefuse.ingest(tmp_path / "s.zarr", {"optical": ""})
    assert list(tmp_path.iterdir()) == []


# paths that are no regular file: a pipe, a symlink loop ---------------------------------------------


def test_a_stac_file_that_is_a_pipe_says_so(tmp_path, capsys):
    """`ingest --stac fifo` said 'STAC file fifo does not exist'; `-m optical=fifo` said 'not a regular file'."""
    import os

    os.mkfifo(tmp_path / "items.json")
    code, _, err = run_cli(["ingest", tmp_path / "s.zarr", "--stac", tmp_path / "items.json", "--asset", "optical=B04"], capsys)
    line = one_line(code, err, "is not a regular file (a pipe or a device)")
    assert "STAC file" in line and "does not exist" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.json"]


def test_a_symlink_loop_given_as_an_input_is_called_one(tifs, tmp_path, capsys):
    """`ln -s loop loop` given as an input was reported as missing ('loop does not exist')."""
    import os

    loop = tmp_path / "loop"
    os.symlink(loop.name, loop)
    os.symlink("b", tmp_path / "a")  # a loop of two links
    os.symlink("a", tmp_path / "b")
    out = tmp_path / "s.zarr"
    commands = {
        "STAC file": ["ingest", out, "--stac", loop, "--asset", "optical=B04"],
        "STAC file ": ["ingest", out, "--stac", tmp_path / "a", "--asset", "optical=B04"],
        "modality 'optical'": ["ingest", out, "-m", f"optical={loop}"],
        "modality 'sar'": ["ingest", out, "-m", f"sar={tmp_path / 'b'}:1"],
        "labels": ["ingest", out, "-m", f"optical={tifs['optical']}", "--labels", loop],
    }
    for what, args in commands.items():
        code, _, err = run_cli(args, capsys)
        line = one_line(code, err, "is a symlink loop")
        assert what.strip() in line and "point the link at" in line and "does not exist" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "loop"]
    from tilefuse.errors import read_json

    with pytest.raises(InputError, match="scheduler file .* is a symlink loop"):
        read_json(loop, "scheduler file", "pass the file the scheduler wrote")
    with pytest.raises(InputError, match="does not exist: start it"):  # still: a missing file, and its own fix
        read_json(tmp_path / "none.json", "scheduler file", "pass the file the scheduler wrote", missing="start it")


# demo ------------------------------------------------------------------------------------------------

DEMO = ["--steps", "1", "--cluster", "sync"]


@pytest.mark.parametrize("size", [128, 255])
def test_demo_refuses_a_size_it_cannot_train_on_before_writing(size, tmp_path, capsys):
    """`demo dm --size 128` wrote the scenes, then said 'the split leaves nothing to train on: lower val_fraction= /
    test_fraction= (--val-fraction / --test-fraction)', options demo does not have, leaving a partial dm/."""
    from tilefuse.pipelines.demo import MIN_SIZE, demo

    code, _, err = run_cli(["demo", tmp_path / "dm", "--size", size, *DEMO], capsys)
    line = one_line(code, err, f"--size {MIN_SIZE} or more")
    assert "size= (--size)" in line and "val-fraction" not in line, line
    assert list(tmp_path.iterdir()) == []
    for bad in (size, 300.0, True):
        with pytest.raises(InputError, match=r"^size= \(--size\) must be a whole number of px >= 256"):
            demo(tmp_path / "dm", size=bad, steps=1, cluster="sync")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--steps", "0", "--cluster", "sync"], "steps= (--steps) must be a whole number >= 1"),
        (["--steps", "1", "--cluster", "bogus"], "unknown cluster spec 'bogus'"),
        (["--steps", "1", "--cluster", "local:0"], "write local:N"),
        (["--steps", "1", "--size", "100000000", "--cluster", "sync"], "choose a smaller size= (--size)"),
    ],
)
def test_demo_refuses_other_options_before_writing(args, pattern, tmp_path, capsys):
    """--steps 0 and --cluster bogus were refused by train and predict, after the scenes (and run) were written."""
    code, _, err = run_cli(["demo", tmp_path / "dm", *args], capsys)
    one_line(code, err, pattern)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "blocker, pattern",
    [
        ("metrics.json", "demo output {out}/metrics.json exists and is a file not written by tilefuse"),
        ("prediction.tif", "demo output {out}/prediction.tif exists"),
        ("run/notes.txt", "demo output {out}/run exists and is a folder not written by tilefuse"),
    ],
)
def test_demo_checks_every_output_before_any_work(blocker, pattern, tmp_path, capsys):
    """A user's file where the demo writes one was found only when the demo got there: `metrics.json` after ~30 s,
    with the stores, run and prediction already replaced (a folder of new and old outputs)."""
    from tilefuse.outputs import create

    out = tmp_path / "dm"
    with create(out, "demo"):  # a demo folder tilefuse made
        pass
    (out / blocker).parent.mkdir(exist_ok=True)
    (out / blocker).write_text("mine\n")
    before = tree(out)
    code, _, err = run_cli(["demo", out, "--size", 256, *DEMO], capsys)
    line = one_line(code, err, pattern.format(out=out))
    assert line.endswith("or choose another demo folder"), line
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["dm"]


@pytest.mark.slow
def test_demo_of_the_smallest_size_runs_and_a_rerun_onto_a_users_file_touches_nothing(tmp_path, capsys):
    """The tester's run: `demo dm --size 256` (ok), `echo mine > dm/metrics.json`, the same demo again: it replaced the
    stores, run and prediction before it failed on metrics.json. Now it is refused before anything is written."""
    from tilefuse.pipelines.demo import MIN_SIZE

    out = tmp_path / "dm"
    code, _, err = run_cli(["demo", out, "--size", MIN_SIZE, *DEMO], capsys)
    assert code == 0, err
    (out / "metrics.json").write_text("mine\n")
    before = tree(out)
    code, _, err = run_cli(["demo", out, "--size", MIN_SIZE, *DEMO], capsys)
    one_line(code, err, f"demo output {out}/metrics.json exists")
    assert tree(out) == before
