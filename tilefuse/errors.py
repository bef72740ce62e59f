"""The one exception type that means "the user's input is wrong", and reading the JSON files users pass."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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


def clipped(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters (ending in "..." where cut): a bad value quoted in a one-line message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: str | os.PathLike, what: str, fix: str, *, missing: str | None = None) -> Any:
    """The JSON document in file ``path``; a missing, unreadable or malformed file is one :class:`InputError` line.

    ``what`` names the file in messages (e.g. ``"scheduler file"``), ``fix``
    says what to pass instead, ``missing`` what to do when the file does not
    exist (default ``fix``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist: {missing or fix}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = f"{type(error).__name__}: {error}" if isinstance(error, OSError) else f"it is not JSON: {error}"
        raise InputError(f"{what} {path} is unreadable ({reason}): {fix}") from None
