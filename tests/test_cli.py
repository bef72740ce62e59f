import pytest

from tilefuse.cli import COMMANDS, main


def test_usage_errors_exit_2_with_one_message(capsys):
    assert main(["models", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err


def _numeric_options():
    """(command, option, values that are not of its type) for every int and float option of every command."""
    import importlib
    import typing

    for name, target in sorted(COMMANDS.items()):
        module, function = target.split(":")
        hints = typing.get_type_hints(getattr(importlib.import_module(module), function), include_extras=True)
        for param, hint in hints.items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            base = next((t for t in typing.get_args(base) if t is not type(None)), base)  # Optional[int] -> int
            options = [a for a in typing.get_args(hint)[1:] if type(a).__name__ == "OptionInfo"]
            if base in (int, float) and options:
                option = next((d for d in options[0].param_decls or () if d.startswith("--")), "--" + param.replace("_", "-"))
                yield name, option, ("abc", "") + (("1.5", "nan") if base is int else ())


def test_every_usage_error_is_one_line_naming_the_option_and_the_help(capsys):
    """Click prints three lines (Usage, Try, Error) for a value of the wrong type; the contract is one."""
    cases = list(_numeric_options())
    assert len(cases) > 20  # the options are found
    for command, option, values in cases:
        for value in values:
            assert main([command, option, value]) == 2, (command, option, value)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("tilefuse: error: "), (command, option, value, err)
            assert option in lines[0] and f"tilefuse {command} --help" in lines[0], lines[0]
    for argv, words in ((["nosuch"], ("nosuch", "tilefuse --help")), (["train"], ("--model", "tilefuse train --help")), (["synth"], ("out", "synth --help"))):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), lines


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
        "modality_dropout_fill": (["--modality-dropout-fill", "noise"], "noise"),
        "modality_jitter": (["--modality-jitter", "sar=0.5", "--modality-jitter", "optical=0.25"], {"sar": 0.5, "optical": 0.25}),
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


@pytest.mark.parametrize("odd", ["\n", "\r", "\x1b[2J", "\u2028", "\x85"])
def test_a_path_with_a_line_break_or_control_character_is_still_one_line(odd, tmp_path, capsys):
    """The message quotes the path: a newline in it (a script's stray '\\n') printed two lines, an escape
    sequence reached the terminal."""
    for argv in (
        ["info", tmp_path / f"a{odd}b.zarr"],
        ["ingest", tmp_path / "s.zarr", "-m", f"sar={tmp_path}/a{odd}b.tif"],
        ["synth", tmp_path / "s.zarr", "--kind", f"x{odd}y"],
        ["info", tmp_path / "s.zarr", f"--no-such{odd}option"],
    ):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.endswith("\n"), repr(err)
        assert all(c.isprintable() for c in err[:-1]), repr(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("odd", ["\n", "\x1b[2J"])
def test_a_written_path_with_a_line_break_or_control_character_is_reported_in_one_line(odd, tmp_path, capsys):
    """'wrote a<newline>b.zarr' split the success line in two (error lines were escaped already)."""
    store = tmp_path / f"a{odd}b.zarr"
    assert main(["synth", str(store), "--size", "16"]) == 0
    assert main(["export", str(store), str(tmp_path / f"c{odd}d.tif")]) == 2  # a scene is no prediction: one line
    assert main(["info", str(store), "--quicklook", str(tmp_path / f"q{odd}.png")]) == 0
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        for line in stream.splitlines():
            assert all(c.isprintable() for c in line), repr(line)
    assert "wrote " in captured.out and repr(odd)[1:-1] in captured.out, captured.out


def _single_options():
    """(command, option spelling, nargs) for every option of every command that takes one value (not multiple)."""
    import typer.main

    from tilefuse.cli import app

    for name, command in sorted(typer.main.get_command(app).commands.items()):
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option" and not param.multiple and not param.is_flag:
                yield name, param.opts[0], param.nargs


def test_an_option_given_twice_is_one_line_naming_it(capsys):
    """click kept the last value without a word: `predict --store a.zarr --store b.zarr` predicted b,
    `ingest --labels a.tif --labels b.tif` ingested b's labels."""
    cases = list(_single_options())
    assert len(cases) > 40
    for command, option, nargs in cases:
        first, second = ["1"] * nargs, ["2"] * nargs
        for argv in ([command, option, *first, option, *second], [command, f"{option}={first[0]}", option, *second] if nargs == 1 else None):
            if argv is None:
                continue
            assert main(argv) == 2, argv
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"{option} is given twice" in lines[0] and f"tilefuse {command} --help" in lines[0], (argv, lines)
    assert main(["info", "s.zarr", "--verify", "--no-verify"]) == 2
    assert "--no-verify" in capsys.readouterr().err


def _value_parameters():
    """(command, spelling, nargs) for every option of every command that takes a value, and (command, NAME, None)
    for every positional argument."""
    import typer.main

    from tilefuse.cli import app

    for name, command in sorted(typer.main.get_command(app).commands.items()):
        before = []  # the positional arguments ahead of this one
        for param in command.params:
            kind = getattr(param, "param_type_name", "")
            if kind == "option" and not param.is_flag:
                yield name, param.opts[0], param.nargs, []
            elif kind == "argument":
                yield name, param.name.upper(), None, list(before)
                before.append("x")


def test_an_empty_value_is_one_line_naming_it(capsys):
    """click hands a path parameter '' as Path(''), the current folder: `--out "$OUT"` with OUT unset read or
    replaced the folder the shell stood in (the Python API refused '' all along)."""
    cases = list(_value_parameters())
    assert len(cases) > 60
    for command, name, nargs, before in cases:
        forms = [[name, *[""] * nargs], [f"{name}="]] if nargs else [[*before, ""]]
        if nargs and not name.startswith("--"):
            forms = forms[:1]
        for form in forms:
            argv = [command, *form]
            assert main(argv) == 2, argv
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"{name} is" in lines[0] and "empty" in lines[0], (argv, lines)
            assert f"tilefuse {command} --help" in lines[0], lines


def test_an_empty_output_never_replaces_the_folder_the_shell_stands_in(tmp_path, monkeypatch, capsys):
    from test_bad_input_ops import _digest as tree_digest

    assert main(["synth", str(tmp_path / "s.zarr"), "--size", "64"]) == 0
    before = tree_digest(tmp_path / "s.zarr")
    monkeypatch.chdir(tmp_path / "s.zarr")
    for argv in (["synth", "", "--size", "64", "--overwrite", "--seed", "3"], ["synth", "--size", "64", "--overwrite", "--", ""]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.startswith("tilefuse: error: OUT is empty")
    assert tree_digest(tmp_path / "s.zarr") == before
