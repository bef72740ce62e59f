"""Write-then-rename: how every output of tilefuse appears whole or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (same filesystem, so a rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished ``src`` (file or folder) to ``dst``, replacing what is there.

    A folder cannot be renamed over a non-empty one, so an existing ``dst``
    first moves aside and is deleted once ``src`` is in place: at every moment
    ``dst`` is either the old complete output or the new one.
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        trash = temporary_sibling(dst, "old")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
