"""Saved sampler indexes: a restart does not read every store's ``valid`` and ``label`` again.

A sampler's index (per store: the read windows and their eligible-origin
weights, or the labelled pixels per window) costs one pass over ``valid`` and
``label`` of every store. :class:`IndexCache` keeps it in a folder (a run
folder's :data:`INDEX_DIR`), one ``.npz`` per store and sampler, named by the
digest of

- the store's identity (:meth:`tilefuse.sampling.reader.SceneReader.identity`:
  its path and the metadata, sizes and mtimes of the files of ``valid`` and
  ``label``), and
- the sampling settings the index depends on (patch, margin, window geometry,
  minimum labelled share, class balancing, the store's split blocks, ...).

A changed store or setting gives another name, so a stale index is never
read: it is rebuilt, and :meth:`IndexCache.save` drops files no sampler asked
for. Reading never writes; :meth:`IndexCache.save` writes each new entry under
a temporary name and renames it (inside the run folder the run owns and
locks). Files hold plain arrays (``allow_pickle=False``).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

INDEX_DIR = "index"
"""Folder of the saved indexes inside a run folder."""
FORMAT = 2
"""Bumped whenever what an index holds changes: older files then never match."""


class IndexCache:
    """Per-store sampler indexes read from ``folder`` (None: read nothing) and saved by :meth:`save`."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.pending: dict[str, dict[str, np.ndarray]] = {}
        self.used: set[str] = set()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, identity: str, settings: Mapping[str, Any]) -> str:
        """The entry name of sampler ``kind``'s index of the store with ``identity`` under ``settings`` (JSON)."""
        text = json.dumps({"format": FORMAT, "kind": kind, "store": identity, "settings": settings}, sort_keys=True)
        return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The saved arrays of ``key``, or None (absent, unreadable: the caller rebuilds them)."""
        self.used.add(key)
        if key in self.pending:
            return self.pending[key]
        if self.folder is not None:
            try:
                with np.load(self.folder / f"{key}.npz", allow_pickle=False) as data:
                    arrays = {name: data[name] for name in data.files}
                self.hits += 1
                return arrays
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):
                pass
        self.misses += 1
        return None

    def put(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep a freshly built entry for :meth:`save`."""
        self.used.add(key)
        self.pending[key] = dict(arrays)

    def save(self, folder: str | os.PathLike | None = None) -> Path | None:
        """Write the new entries into ``folder`` (default: the one read from) and drop entries nobody used."""
        from tilefuse.outputs import INDEX_FILE, replace_path, temporary_sibling

        target = Path(folder) if folder is not None else self.folder
        if target is None:
            return None
        target.mkdir(parents=True, exist_ok=True)
        for key, arrays in self.pending.items():
            path = target / f"{key}.npz"
            if path.is_file():
                continue
            tmp = temporary_sibling(path)
            try:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, **arrays)
                replace_path(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        for path in target.glob("*.npz"):
            if INDEX_FILE.match(path.name) and path.stem not in self.used:  # never a file of the user's
                path.unlink(missing_ok=True)
        self.pending.clear()
        self.folder = target
        return target
