"""``tilefuse models``: registered models with parameter counts, text and JSON, and its errors."""

from __future__ import annotations

import json

import pytest

from tilefuse.cli import main
from tilefuse.errors import InputError
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


def _typed_hyperparameters():
    """(model, key, default) for every hyperparameter of a built-in model whose default is a bool, int, float or str."""
    import inspect

    from tilefuse.tile_model import available_models

    for name in ("pad", "s2fin"):
        for key, p in list(inspect.signature(available_models()[name].builder).parameters.items())[2:]:
            if isinstance(p.default, (bool, int, float, str)):
                yield name, key, p.default


def test_a_hyperparameter_of_the_wrong_type_or_value_is_one_line_naming_it(capsys):
    """`--set dim=true`, `--hparam preset=[1]`, `topk=1e400`, `heads=0` were TypeError / ZeroDivisionError
    tracebacks in `models --set` and `train --hparam` (or, for topk, silently inf)."""
    from tilefuse.tile_model import build_model

    cases = list(_typed_hyperparameters())
    assert len(cases) >= 10
    wrong = {bool: [1, "yes", None], int: [True, 2.5, "8", [1], float("inf")], float: [True, "abc", float("nan"), [0.1]], str: [1, ["micro"], True]}
    for name, key, default in cases:
        for value in wrong[type(default)]:
            with pytest.raises(InputError, match=rf"^{name} hyperparameter {key}= must be .*, got "):
                build_model(name, {"optical": 4, "sar": 2}, 3, **{key: value})
    with pytest.raises(InputError, match=r"^model 's2fin' cannot be built with hparams heads=0 \(ZeroDivisionError"):
        build_model("s2fin", {"optical": 4, "sar": 2}, 3, heads=0)
    build_model("s2fin", {"optical": 4, "sar": 2}, 3, dim=32, dropout=0, tta=True)  # right types still build
    for argv in (["models", "s2fin", "--set", "dim=true"], ["models", "pad", "--set", "preset=[1]"], ["models", "s2fin", "--set", "heads=0"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_float_hyperparameter_with_a_whole_number_default_takes_any_number():
    """`scale: float = 1` is how a user writes a float default: 0.5 was refused as 'must be a whole number' (and an
    older checkpoint saved with scale=0.5 no longer loaded)."""
    from torch import nn

    import tilefuse

    @tilefuse.register_model("test-float-default")
    def build(modalities, num_classes, scale: float = 1, steps: int = 2, shape=(3, 3)):
        return tilefuse.wrap_module(nn.Conv2d(sum(modalities.values()), num_classes, 1), dict(modalities), num_classes)

    try:
        for value in (0.5, 2, 1e-3):
            build_model("test-float-default", {"optical": 3}, 2, scale=value, shape=[1, 2])
        for key, value in (("scale", "0.5"), ("scale", float("nan")), ("steps", 0.5)):
            with pytest.raises(InputError, match=rf"^test-float-default hyperparameter {key}= must be"):
                build_model("test-float-default", {"optical": 3}, 2, **{key: value})
    finally:
        from tilefuse import tile_model

        tile_model._REGISTRY.pop("test-float-default", None)
