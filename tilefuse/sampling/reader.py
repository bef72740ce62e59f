"""Reading scene stores for the samplers: rectangular extents straight from zarr, and a store's identity.

A *store* handed to a sampler is a path or any object with
:class:`SceneReader`'s ``path``, ``shape``, ``chunk``, ``has`` and ``read``
(tests use in-memory readers). :meth:`SceneReader.identity` is what a saved
window index is keyed by (:mod:`tilefuse.sampling.index`); readers without it
are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

INDEX_ARRAYS = ("valid", "label")
"""The arrays a window index is computed from: a store's identity covers exactly these."""


class SceneReader:
    """Reads rectangular extents of a scene store straight from zarr, one decode per call.

    Opens the zarr group lazily, so a reader can be pickled into a DataLoader
    worker and opens its own handle there.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._group = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_group": None}

    @property
    def group(self):
        """The store's zarr group, read through :func:`tilefuse.storage.open_group` (damaged chunks raise InputError)."""
        if self._group is None:
            from tilefuse.storage import open_group

            self._group = open_group(self.path)
        return self._group

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(n) for n in self.group["valid"].shape)

    @property
    def chunk(self) -> tuple[int, int]:
        """Spatial edge of the store's (inner) chunks, the unit one read decodes."""
        return tuple(int(n) for n in self.group["valid"].chunks)

    def has(self, name: str) -> bool:
        return name in self.group

    def read(self, y0: int, y1: int, x0: int, x1: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Arrays ``names`` over rows ``y0:y1`` and columns ``x0:x1`` (bands first for modalities)."""
        out = {}
        for name in names:
            array = self.group[name]
            out[name] = array[..., y0:y1, x0:x1] if array.ndim == 3 else array[y0:y1, x0:x1]
        return out


    def identity(self, names: Sequence[str] = INDEX_ARRAYS) -> str:
        """Digest of arrays ``names`` as stored: the resolved path, each array's metadata, and the
        relative path, size and modification time (ns) of every file holding its chunks or shards.

        Any rewrite of a chunk through zarr (or any tool) changes its file's
        mtime, so a changed store never matches an index saved before the
        change. Costs one ``stat`` per stored file, no chunk is read.
        """
        return store_identity(self.path, names)


def store_identity(path: str | os.PathLike, names: Sequence[str] = INDEX_ARRAYS) -> str:
    """See :meth:`SceneReader.identity`."""
    root = Path(path).resolve()
    digest = hashlib.sha256(str(root).encode())
    for name in names:
        folder = root / name
        digest.update(f"\0array {name}\0".encode())
        if not folder.is_dir():
            continue
        entries = []
        for directory, _, files in os.walk(folder):
            for file in files:
                full = os.path.join(directory, file)
                info = os.stat(full)
                entries.append((os.path.relpath(full, folder), info.st_size, info.st_mtime_ns))
        entries.sort()
        digest.update(json.dumps(entries).encode())
        meta = folder / "zarr.json"
        if meta.is_file():
            digest.update(meta.read_bytes())
    return digest.hexdigest()


Store = Union[str, os.PathLike, SceneReader]
"""A scene store path, or any object with SceneReader's ``path``, ``shape``, ``chunk``, ``has`` and ``read``."""


def open_readers(stores: Sequence) -> list[SceneReader]:
    """Readers of ``stores``: paths become :class:`SceneReader`, reader objects pass through."""
    return [s if hasattr(s, "read") else SceneReader(s) for s in stores]

