"""What every sampler shares: the stores and their readers, modalities, split, seed, index cache, pickling.

A sampler hands out :class:`Sample` streams (:meth:`StoreSampler.iter_stream`);
one DataLoader worker runs one stream. Samplers are pickled into DataLoader
workers: readers reopen their zarr handles there, and whatever a subclass
names in ``_transient`` (decoded caches) travels empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from tilefuse.errors import InputError
from tilefuse.sampling.index import IndexCache
from tilefuse.sampling.reader import Store, open_readers
from tilefuse.sampling.split import SUBSETS, SpatialSplit, touches

DEFAULT_WINDOW = 1024
"""Edge (px) of the chunk-aligned window one decode reads."""


@dataclass(frozen=True)
class Sample:
    """Raw store values around one position: what a sampler hands to the dataset."""

    store: int
    y: int
    """Row of the top-left input pixel in the store (may be negative where reflect-padded)."""
    x: int
    data: dict[str, np.ndarray]
    """modality -> (C, P, P) in the store's dtype."""
    label: np.ndarray
    """(P, P) uint8; IGNORE where unlabelled or not valid."""
    dihedral: int = 0
    """Augmentation drawn for this sample: rotate by 90° x (d % 4), then flip columns if d >= 4."""
    window: int = -1
    """Index of the decoded window it was cut from (random patches), for diagnostics."""


class StoreSampler:
    """Base of the samplers: ``stores`` (paths or readers), the ``modalities`` to cut, the ``split`` area
    of ``subset`` they draw from, and ``seed``. Subclasses implement :meth:`iter_stream`."""

    _transient: tuple[str, ...] = ()
    """Attributes that are not pickled (set to None in a worker's copy)."""

    def __init__(
        self,
        stores: Sequence[Store],
        modalities: Sequence[str],
        *,
        split: SpatialSplit | None = None,
        subset: str = "train",
        seed: int = 0,
    ) -> None:
        if subset not in SUBSETS:
            raise InputError(f"unknown subset {subset!r}: choose one of {', '.join(SUBSETS)}")
        self.readers = open_readers(stores)
        self.paths = [r.path for r in self.readers]
        self.modalities = list(modalities)
        self.split, self.subset = split, subset
        self.seed = int(seed)
        if split is not None and len(split.assignment) != len(self.readers):
            raise ValueError(f"the split covers {len(split.assignment)} stores, the sampler has {len(self.readers)}")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._transient:
            state[name] = None
        return state

    def require_labels(self) -> None:
        """Refuse a store without labels (one line naming the fix)."""
        for path, reader in zip(self.paths, self.readers):
            if not reader.has("label"):
                raise InputError(f"{path} has no labels: ingest it with --labels PATH to train on it")

    def touches(self, store: int, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether rows ``y0:y1``, columns ``x0:x1`` of ``store`` hold any block of the subset (no I/O)."""
        return touches(self.split, self.subset, store, y0, y1, x0, x1)

    def region(self, store: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray | None:
        """Pixels of the extent in the subset's blocks (None: no split, everything)."""
        return None if self.split is None else self.split.region(store, self.subset, y0, y1, x0, x1)

    def split_settings(self, store: int) -> Any:
        """The part of the split an index of ``store`` depends on (JSON)."""
        if self.split is None:
            return None
        return {"subset": self.subset, "block": self.split.block, "assignment": self.split.assignment[store].tolist()}

    def store_index(
        self, cache: IndexCache | None, kind: str, store: int, settings: Mapping[str, Any], build: Callable[[], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """``build()`` the index of ``store``, or take it from ``cache`` when saved for this store and ``settings``."""
        identity = getattr(self.readers[store], "identity", None)
        if cache is None or identity is None:
            return build()
        key = cache.key(kind, identity(), {**settings, "split": self.split_settings(store)})
        arrays = cache.get(key)
        if arrays is None:
            arrays = build()
            cache.put(key, arrays)
        return arrays

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0) -> Iterator[Sample]:
        """Samples of ``stream`` of ``streams``, skipping the first ``start`` (to resume exactly)."""
        raise NotImplementedError
