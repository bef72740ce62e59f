"""The one exception type that means "the user's input is wrong", and reading the JSON files and KEY=VALUE options users pass."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence


class InputError(Exception):
    """Bad input: the CLI prints the message as one line on stderr and exits with status 2.

    The message names the problem and what to do about it, e.g.
    ``"no CRS in hsi.tif: pass --crs EPSG:32611"``.
    """

    def __init__(self, message: str = "", *args) -> None:
        # torch's DataLoader re-raises a worker's exception as ``type(message + traceback)``:
        # keep the original one line, which is the traceback's last line
        text = str(message)
        if "\nOriginal Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            text = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(text, *args)


def printable(text: str) -> str:
    """``text`` for one line of output: a line break or control character in it (in a path a user typed) is
    written escaped, as Python writes it in a string, so it never breaks the line or moves the cursor."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def clipped(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters (ending in "..." where cut): a bad value quoted in a one-line message.

    Every run of whitespace (line breaks included: the repr of an xarray Dataset, a library's multi-line error) is
    collapsed to one space first, so the message stays one line for the Python API too, not only where the CLI
    escapes it (:func:`printable`).
    """
    text = re.sub(r"\s+", " ", str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def symlink_loop(path: str | os.PathLike) -> bool:
    """Whether ``path`` cannot be reached because its symlinks form a loop (``ln -s a a``)."""
    import errno

    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def read_json(path: str | os.PathLike, what: str, fix: str, *, missing: str | None = None) -> Any:
    """The JSON document in file ``path``; a missing, unreadable or malformed file is one :class:`InputError` line.

    ``what`` names the file in messages (e.g. ``"scheduler file"``), ``fix``
    says what to pass instead, ``missing`` what to do when the file does not
    exist (default ``fix``).
    """
    import errno
    import stat

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as error:  # Path.is_file() is False for all of these: each was "does not exist"
        if error.errno == errno.ELOOP:
            raise InputError(
                f"{what} {path} is a symlink loop (its links lead back to themselves, never to a file): "
                f"point the link at the {what}, or pass the file's own path"
            ) from None
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{what} {path} is unreadable ({type(error).__name__}: {error.strerror}): {fix}") from None
        raise InputError(f"{what} {path} does not exist: {missing or fix}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{what} {path} is a folder, not a file: {fix}")
    if not stat.S_ISREG(mode):  # a named pipe or <(...): reading it waits for a writer, or takes what another reader left
        raise InputError(f"{what} {path} is not a regular file (a pipe or a device): save it to a file and pass that")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = f"{type(error).__name__}: {error}" if isinstance(error, OSError) else f"it is not JSON: {error}"
        raise InputError(f"{what} {path} is unreadable ({reason}): {fix}") from None


def json_or_text(text: str) -> Any:
    """An option value as JSON where it parses (``3``, ``true``, ``[1, 2]``), else the text itself (``femto``)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
        return text


def key_values(
    items: Sequence[str] | None, option: str, example: str, value: Callable[[str], Any] = json_or_text, form: str = "KEY=VALUE"
) -> dict[str, Any] | None:
    """A repeated ``option KEY=VALUE`` as a dict, each VALUE through ``value``; None when it was not given.

    An item that is not KEY=VALUE, whose VALUE ``value`` refuses (``ValueError``), or whose KEY an earlier
    item gave already is one :class:`InputError` naming ``option`` and a correct ``example``.
    """
    if items is None:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            parsed = value(text)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise InputError(f"{option} {item!r} is not {form}: write e.g. {option} {example}")
        if key in out:
            raise InputError(f"{option} names {key!r} twice: give each once")
        out[key] = parsed
    return out
