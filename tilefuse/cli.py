"""The ``tilefuse`` command line: a thin shell over the pipelines.

Each command lives next to the job it runs (``tilefuse.pipelines.<name>``) and
is registered here by name. Expected errors (:class:`InputError`) end as one
line on stderr and exit status 2, and so do filesystem errors that keep an
output from being written (read-only, full, no permission: a safety net behind
:mod:`tilefuse.outputs`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import stat
import sys
import warnings

import typer

from tilefuse.errors import InputError, printable
from tilefuse.signals import stopping, terminating

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


def repeated_option(argv: list[str]) -> str | None:
    """The line for an option of one value given twice in ``argv`` (or a flag with its opposite), else None.

    click keeps the last value without a word (``predict --store a.zarr --store b.zarr`` predicted b); options
    taken several times (``--modality``, ``--store`` of train) and a flag repeated as such are fine.
    """
    import typer.main

    if not argv:
        return None
    command = getattr(typer.main.get_command(app), "commands", {}).get(argv[0])
    if command is None:
        return None
    options = {spelling: param for param in command.params if getattr(param, "param_type_name", "") == "option"
               for spelling in (*param.opts, *param.secondary_opts)}  # fmt: skip
    seen: dict[str, tuple[str, list[str]]] = {}
    tokens = list(argv[1:])
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            break
        spelling, has_value, value = token.partition("=") if token.startswith("--") else (token, "", "")
        param = options.get(spelling)
        if param is None or param.multiple:
            if param is not None and not param.is_flag and not has_value:
                i += param.nargs
            continue
        values = [value] if has_value else ([] if param.is_flag else tokens[i : i + param.nargs])
        if not has_value and not param.is_flag:
            i += param.nargs
        if param.name in seen and (not param.is_flag or seen[param.name][0] != spelling):
            before, shown = seen[param.name], " ".join(values)
            both = f"{before[0]} {' '.join(before[1])}".strip() + f", then {spelling} {shown}".rstrip()
            return f"{spelling} is given twice ({both}): give it once: see `tilefuse {argv[0]} --help`"
        seen[param.name] = (spelling, values)
    return None


def empty_argument(argv: list[str]) -> str | None:
    """The line for an empty value in ``argv`` (``--out "$OUT"`` with ``OUT`` unset), else None.

    click hands typer's path parameters ``''`` as ``Path('')``, the current folder: ``synth "$OUT" --overwrite``
    replaced the store the shell stood in, and ``--store ''`` read it. No option of tilefuse takes an empty value.
    """
    import typer.main

    if not argv:
        return None
    command = getattr(typer.main.get_command(app), "commands", {}).get(argv[0])
    if command is None:
        return None
    kinds = {"option": [], "argument": []}
    for param in command.params:
        kinds.setdefault(getattr(param, "param_type_name", ""), []).append(param)
    options = {spelling: param for param in kinds["option"] for spelling in (*param.opts, *param.secondary_opts)}
    arguments = [param for param in kinds["argument"] if param.nargs == 1]
    tokens, i, position, options_end = list(argv[1:]), 0, 0, False
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--" and not options_end:
            options_end = True
            continue
        if token.startswith("-") and token != "-" and not options_end:
            spelling, has_value, value = token.partition("=") if token.startswith("--") else (token, "", "")
            param = options.get(spelling)
            if param is None or param.is_flag:
                continue
            values = [value] if has_value else tokens[i : i + param.nargs]
            i += 0 if has_value else param.nargs
            if "" in values:
                return f"{spelling} is given an empty value (an unset shell variable?): give it one: see `tilefuse {argv[0]} --help`"
            continue
        if token == "":
            name = arguments[position].name.upper() if position < len(arguments) else "an argument"
            return f"{name} is empty (an unset shell variable?): give it a value: see `tilefuse {argv[0]} --help`"
        position += 1
    return None


def _error(message: str) -> None:
    """Print ``message`` as the one line ``tilefuse: error: ...`` on stderr: a line break or control character
    in it (a path quoted in the message) is written escaped, as Python writes it in a string."""
    print(f"tilefuse: error: {printable(message)}", file=sys.stderr)


SIGPIPE_STATUS = 141
"""Exit status when the reader of stdout went away (``tilefuse models | head -1``): 128 + SIGPIPE, what the
shell reports for any Unix tool a closed pipe ended (``yes | head``), so ``set -o pipefail`` scripts never take a
cut-off run for a finished one, while plain pipelines ignore it."""


def _pipe_probe() -> int | None:
    """A second descriptor of stdout when it is a pipe, to tell afterwards whether its reader went away (typer
    and rich answer a closed pipe by exiting 1 without a word, rich after pointing stdout at /dev/null)."""
    with contextlib.suppress(OSError, ValueError):
        if stat.S_ISFIFO(os.fstat(1).st_mode):
            return os.dup(1)
    return None


def _reader_gone(probe: int | None) -> bool:
    if probe is None:
        return False
    poller = select.poll()
    poller.register(probe, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _stdout_closed() -> int:
    """End quietly after a write to a closed stdout: later writes (and the interpreter's final flush) go to
    /dev/null instead of printing a BrokenPipeError."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return SIGPIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status instead of raising SystemExit.

    A closed stdout (``tilefuse models | head -1``) ends quietly with :data:`SIGPIPE_STATUS`.
    """
    probe = _pipe_probe()
    try:
        status = _main(argv)
        if status == 0 and sys.stdout is not None:  # None: started with stdout closed (>&-)
            sys.stdout.flush()
        return _stdout_closed() if status == 1 and _reader_gone(probe) else status
    except BrokenPipeError:
        if probe is None or _reader_gone(probe):
            return _stdout_closed()
        raise
    finally:
        if probe is not None:
            os.close(probe)


def _main(argv: list[str] | None) -> int:
    try:
        os.getcwd()
    except FileNotFoundError:  # every relative path (and some libraries' loading) would fail with a traceback
        _error("the current folder no longer exists (deleted or replaced since this shell entered it): "
               'cd into an existing folder (e.g. cd "$PWD") and run the command again')
        return 2
    args = sys.argv[1:] if argv is None else list(argv)
    problem = repeated_option(args) or empty_argument(args)
    if problem:
        _error(problem)
        return 2
    try:
        # not standalone, so InputError reaches us; typer answers an interrupt by returning 130. SIGTERM (a batch
        # system's cancel or time limit, kill) unwinds like an exit: locks released, temporaries removed
        with terminating():
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


def entry() -> None:
    """The ``tilefuse`` console script: :func:`main`, then exit with its status.

    An interrupted command says so in one line and nothing more. Its locks and
    temporaries are released on the way out; what else Python would print is
    noise from libraries cut mid-task (zarr's IO loop: a half-made event loop's
    ``__del__`` traceback, "coroutine ... was never awaited", "Task was destroyed
    but it is pending!", a traceback from its exit handler joining a thread the
    interrupt kept from starting), seen after about one early Ctrl-C in ten. So
    after SIGINT or SIGTERM, unraisable exceptions are dropped, and the process ends at
    once (``os._exit``) instead of running interpreter shutdown.
    """
    def interrupt(signum, _frame) -> None:
        stopping.set()
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, interrupt)
    default_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if stopping.is_set() else default_hook(unraisable)
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    status = main()
    if status in (130, 143):  # SIGINT, SIGTERM (tilefuse.signals)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
