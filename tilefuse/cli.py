"""The ``tilefuse`` command line: a thin shell over the pipelines.

Each command lives next to the job it runs (``tilefuse.pipelines.<name>``) and
is registered here by name. Expected errors (:class:`InputError`) end as one
line on stderr and exit status 2, and so do filesystem errors that keep an
output from being written (read-only, full, no permission: a safety net behind
:mod:`tilefuse.outputs`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from tilefuse.errors import InputError

# command name -> "module:function"; the function carries typer annotations.
COMMANDS: dict[str, str] = {
    "synth": "tilefuse.pipelines.synth:synth_command",
    "ingest": "tilefuse.pipelines.ingest:ingest_command",
    "info": "tilefuse.pipelines.info:info_command",
    "models": "tilefuse.pipelines.models:models",
    "train": "tilefuse.pipelines.train:train_command",
    "predict": "tilefuse.pipelines.predict:predict_command",
    "evaluate": "tilefuse.pipelines.evaluate:evaluate_command",
    "export": "tilefuse.pipelines.export:export_command",
    "demo": "tilefuse.pipelines.demo:demo_command",
}

app = typer.Typer(
    name="tilefuse",
    help="Streaming tiled inference and patch training for large multimodal scenes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    for name, target in COMMANDS.items():
        module, function = target.split(":")
        app.command(name)(getattr(importlib.import_module(module), function))


_register()


def usage_line(error: Exception) -> str:
    """One line for a usage error of the option parser (a value that is not a number, a missing option, an
    unknown command): click's message and the ``--help`` of the command it concerns (click prints three lines)."""
    names = []
    context = getattr(error, "ctx", None)
    while context is not None and context.parent is not None:
        names.append(context.info_name)
        context = context.parent
    command = " ".join(["tilefuse", *reversed(names)])
    message = " ".join(error.format_message().split()).rstrip(".")
    return f"{message}: see `{command} --help`"


def _error(message: str) -> None:
    """Print ``message`` as the one line ``tilefuse: error: ...`` on stderr: a line break or control character
    in it (a path quoted in the message) is written escaped, as Python writes it in a string."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"tilefuse: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status instead of raising SystemExit."""
    try:
        # not standalone, so InputError reaches us; typer answers an interrupt by returning 130
        result = app(args=argv, standalone_mode=False)
    except InputError as error:
        _error(str(error))
        return 2
    except KeyboardInterrupt:
        print("tilefuse: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        # the guarded writer (tilefuse.outputs) turns these into InputError; this is the safety net
        from tilefuse.outputs import WRITE_ERRNOS, write_error

        if error.errno not in WRITE_ERRNOS:
            raise
        _error(write_error(error.filename or "the output", error.strerror))
        return 2
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as error:
        # usage errors; typer vendors its own click, so match by shape, not by class
        if hasattr(error, "format_message") and isinstance(getattr(error, "exit_code", None), int):
            if error.format_message().strip():  # empty: the help was shown instead (no arguments)
                _error(usage_line(error))
            return error.exit_code
        raise
    if type(result) is int and result:
        if result == 130:
            print("tilefuse: interrupted", file=sys.stderr)
        return result
    return 0


if __name__ == "__main__":
    sys.exit(main())
