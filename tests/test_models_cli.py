"""``tilefuse models``: registered models with parameter counts, text and JSON, and its errors."""

from __future__ import annotations

import json

import pytest

from tilefuse.cli import main
from tilefuse.tile_model import available_models, build_model


def _run(capsys, *args):
    status = main(["models", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_importing_the_package_registers_both_models():
    assert {"pad", "s2fin"} <= set(available_models())


def test_json_lists_models_with_counts_of_their_example(capsys):
    status, out, _ = _run(capsys, "--json")
    assert status == 0
    records = {r["name"]: r for r in json.loads(out)}
    assert {"pad", "s2fin"} <= set(records)
    for name in ("pad", "s2fin"):
        example = records[name]["example"]
        built = build_model(name, example["modalities"], example["num_classes"], **example["hparams"])
        assert records[name]["parameters"] == built.num_parameters()
        assert records[name]["description"]
    assert records["s2fin"]["example"]["hparams"]["patch_size"] == 11


def test_text_output_names_each_model(capsys):
    status, out, _ = _run(capsys)
    assert status == 0
    lines = out.splitlines()
    assert any(line.startswith("pad ") and " M " in line for line in lines)
    assert any(line.startswith("s2fin ") for line in lines)


def test_overrides_report_the_paper_preset_and_other_bands(capsys):
    status, out, _ = _run(capsys, "pad", "--set", "preset=paper", "--json")
    assert status == 0
    (record,) = json.loads(out)
    assert abs(record["parameters"] - 441e6) / 441e6 < 0.05
    status, out, _ = _run(capsys, "s2fin", "--set", 'modalities={"hsi": 144, "lidar": 1}', "--json")
    (record,) = json.loads(out)
    assert status == 0 and record["example"]["modalities"] == {"hsi": 144, "lidar": 1}
    assert 0.5e6 <= record["parameters"] <= 0.8e6


@pytest.mark.parametrize(
    "args, message",
    [
        (["unet9000"], "unknown model"),
        (["--set", "preset=paper"], "needs a model name"),
        (["pad", "--set", "preset"], "KEY=VALUE"),
        (["pad", "--set", "preset=paper", "--set", "preset=femto"], "--set names 'preset' twice"),
        (["pad", "--set", "widths=3"], "hyperparameter"),
        (["pad", "--set", "preset=huge"], "preset"),
    ],
)
def test_bad_requests_exit_2_with_one_line(capsys, args, message):
    status, out, err = _run(capsys, *args)
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_help(capsys):
    status, out, _ = _run(capsys, "--help")
    assert status == 0 and "--json" in out and "--set" in out
