import pytest

from tilefuse.cli import COMMANDS, main


def test_usage_errors_exit_2_with_one_message(capsys):
    assert main(["models", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_train_command_reaches_every_training_option(monkeypatch, tmp_path):
    """Every field of DataOptions and TrainSettings has a `tilefuse train` option that arrives unchanged."""
    from dataclasses import fields

    import tilefuse.pipelines.train as train_pipeline
    from tilefuse.training import TrainSettings
    from tilefuse.training_data import DataOptions

    flags = {  # option -> (command-line words, value the engine must receive)
        "modalities": (["--modality", "sar", "--modality", "optical"], ["sar", "optical"]),
        "allow_fewer": (["--allow-fewer"], True), "class_balance": (["--class-balance"], True), "amp": (["--no-amp"], False),
        "sampler": (["--sampler", "patches"], "patches"), "split": (["--split", "stores"], "stores"),
        "device": (["--device", "cpu"], "cpu"), "rescale": (["--rescale", "0.5", "2"], [0.5, 2.0]),
    }
    names = [f.name for f in (*fields(DataOptions), *fields(TrainSettings))]
    argv = []
    for number, name in enumerate(names, start=3):
        if name not in flags:  # a number unique to the option, as the option's type wants it
            kind = {f.name: f.type for f in (*fields(DataOptions), *fields(TrainSettings))}[name]
            value = number / 1000 if "float" in str(kind) else number
            flags[name] = (["--" + name.replace("_", "-"), str(value)], value)
        argv += flags[name][0]
    seen = {}
    monkeypatch.setattr(train_pipeline, "train", lambda *args, **kwargs: seen.update(kwargs) or tmp_path)
    (tmp_path / "metrics.json").write_text('{"step": 1}')
    assert main(["train", "--model", "pad", "--store", "s.zarr", "--out", str(tmp_path / "run"), *argv]) == 0
    assert {name: seen.get(name) for name in names} == {name: flags[name][1] for name in names}
