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
