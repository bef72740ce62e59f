"""Training data as a torch ``IterableDataset`` over a sampler of scene stores.

Each DataLoader worker of each rank runs its own stream of the sampler (of
``world x workers`` streams, :class:`StreamState`; :meth:`PatchDataset.for_rank`
picks the rank's share) and opens the stores itself, so the dataset works with
the ``forkserver`` and ``spawn`` start methods. The samplers' streams are
independent draws of one law (random patches) or disjoint shares of one epoch
(labelled pixels, validation tiles), so the union over ranks and workers is the
one-process law. Samples are
normalised with the band statistics the model is trained with, transformed by
the same random flip/rotation across every modality and the labels (and, with
``rescale=(low, high)``, the same random rescale by a factor drawn log-uniformly in
that range, then a random crop back to the patch size, zero / ignore padded where
the rescaled patch is smaller: PAD's paper augmentation; patch models only),
shifted in brightness with ``jitter=sigma`` (each band of each sample by its
own offset from N(0, sigma), in standard deviations) and with
``modality_jitter={name: sigma}`` (every band of that modality of a sample by
one offset from N(0, sigma): a calibration shift, as SAR backscatter moves
with incidence angle, moisture and processing), with
``modality_dropout=p`` one modality of a sample, chosen uniformly, replaced by
zeros (the normalised band mean; ``modality_dropout_fill="noise"``: by N(0, 1)
noise, which carries no information either) with probability p, never every
modality (so the model learns to classify from each one alone too), and cropped to the
model's output: ``(inputs: {modality: Tensor(C, P, P)}, target:
LongTensor(P - 2 margin, P - 2 margin))``.

Exact resume: a DataLoader over an endless ``IterableDataset`` takes batch
``i`` from worker ``i % workers``, and each worker batches consecutive samples
of its stream. :meth:`StreamState.after` turns "``n`` batches consumed" into
the per-stream starting points and stream rotation that make a new DataLoader
continue with exactly the batches an uninterrupted one would have produced,
on every rank of a job of the same world size and worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from torch.utils.data import IterableDataset, get_worker_info

from tilefuse.scene import band_stats, normalise, stored_band_stats

BandStats = dict[str, dict[str, list[float]]]
"""modality -> {"mean": [...], "std": [...]}: the checkpoint config's ``band_stats``."""


class Sampler(Protocol):
    modalities: list[str]

    def iter_stream(self, stream: int = 0, streams: int = 1, start: int = 0) -> Iterator: ...


def pooled_band_stats(scenes: Sequence[xr.Dataset], modalities: Sequence[str]) -> BandStats:
    """Per-band mean and std of each modality over the valid pixels of all ``scenes`` together.

    Combines each store's stored ``band_mean``, ``band_std`` and
    ``band_count`` (weighted by count), as if computed over the union.
    """
    out: BandStats = {}
    for name in modalities:
        counts, sums, squares = 0.0, 0.0, 0.0
        for ds in scenes:
            stats = stored_band_stats(ds, name)  # damaged statistics raise InputError
            if stats is None:
                band_stats(ds, name)  # raises the InputError naming the fix
            mean, std, n = stats
            counts, sums, squares = counts + n, sums + n * mean, squares + n * (std**2 + mean**2)
        total = np.maximum(counts, 1.0)
        mean = sums / total
        std = np.sqrt(np.maximum(squares / total - mean**2, 0.0))
        out[name] = {"mean": mean.tolist(), "std": np.where(std > 0, std, 1.0).tolist()}
    return out


def apply_dihedral(array: np.ndarray, k: int) -> np.ndarray:
    """Rotate the last two axes by 90° x (k % 4), then flip columns if k >= 4 (a view)."""
    out = np.rot90(array, k % 4, axes=(-2, -1))
    return out[..., ::-1] if k >= 4 else out


@dataclass
class StreamState:
    """Where each sampler stream stands: samples handed out, and which stream each rank's worker 0 runs.

    A job of ``world`` ranks with ``workers`` DataLoader workers each draws
    ``streams = world x workers`` streams: rank ``r``'s worker ``w`` runs stream
    ``r x workers + (w + offset) % workers`` (:meth:`stream`). Every rank consumes
    the same number of batches, so one ``offset`` serves all ranks.
    """

    streams: int = 1
    start: tuple[int, ...] = (0,)
    offset: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or self.streams < self.world or self.streams % self.world or len(self.start) != self.streams:
            raise ValueError(f"stream state of {self.streams} streams over {self.world} ranks with {len(self.start)} positions")

    @property
    def workers(self) -> int:
        """Streams (DataLoader workers, at least 1) per rank."""
        return self.streams // self.world

    def stream(self, rank: int, worker: int) -> int:
        """The stream rank ``rank``'s worker ``worker`` runs."""
        return rank * self.workers + (worker + self.offset) % self.workers

    def after(self, batches: int, batch_size: int) -> "StreamState":
        """The state once every rank has consumed ``batches`` more batches of ``batch_size``."""
        start = list(self.start)
        for rank in range(self.world):
            for worker in range(self.workers):
                start[self.stream(rank, worker)] += len(range(worker, batches, self.workers)) * batch_size
        return StreamState(self.streams, tuple(start), (self.offset + batches) % self.workers, self.world)

    def to_dict(self) -> dict:
        return {"streams": self.streams, "start": list(self.start), "offset": self.offset, "world": self.world}

    @classmethod
    def fresh(cls, streams: int, world: int = 1) -> "StreamState":
        return cls(streams, (0,) * streams, 0, world)

    @classmethod
    def from_dict(cls, data: Mapping) -> "StreamState":
        """Inverse of :meth:`to_dict` (a state saved before ranks existed is a world of 1)."""
        return cls(int(data["streams"]), tuple(int(v) for v in data["start"]), int(data["offset"]), int(data.get("world", 1)))


class PatchDataset(IterableDataset):
    """Normalised, augmented ``(inputs, target)`` pairs from a sampler, one stream per worker."""

    def __init__(
        self,
        sampler: Sampler,
        band_stats: BandStats,
        *,
        margin: int = 0,
        augment: bool = True,
        state: StreamState | None = None,
        rescale: tuple[float, float] | None = None,
        jitter: float = 0.0,
        modality_jitter: Mapping[str, float] | None = None,
        modality_dropout: float = 0.0,
        modality_dropout_fill: str = "zeros",
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__()
        if rescale is not None:
            low, high = (float(v) for v in rescale)
            if not 0 < low <= high:
                raise ValueError(f"rescale must be (low, high) with 0 < low <= high, got {rescale!r}")
            if margin:
                raise ValueError("rescale is for patch models (margin 0): it would move a pixel model's centre pixel")
            rescale = (low, high)
        self.sampler = sampler
        self.band_stats = band_stats
        self.margin = int(margin)
        self.augment = augment
        self.state = state
        self.rescale = rescale
        if not jitter >= 0:
            raise ValueError(f"jitter must be >= 0, got {jitter!r}")
        self.jitter = float(jitter)
        self.modality_jitter = {str(n): float(v) for n, v in (modality_jitter or {}).items()}
        unknown = sorted(set(self.modality_jitter) - set(sampler.modalities))
        if unknown or not all(v >= 0 for v in self.modality_jitter.values()):
            raise ValueError(f"modality_jitter must map modalities of {sampler.modalities} to sigmas >= 0, got {modality_jitter!r}")
        if not 0 <= modality_dropout < 1:
            raise ValueError(f"modality_dropout must be a probability in [0, 1), got {modality_dropout!r}")
        self.modality_dropout = float(modality_dropout)
        if modality_dropout_fill not in ("zeros", "noise"):
            raise ValueError(f"modality_dropout_fill must be zeros or noise, got {modality_dropout_fill!r}")
        self.modality_dropout_fill = modality_dropout_fill
        self.seed = int(seed)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} ranks")
        self.rank, self.world = int(rank), int(world)

    def _copy(self, state: StreamState | None, rank: int, world: int) -> "PatchDataset":
        return PatchDataset(
            self.sampler, self.band_stats, margin=self.margin, augment=self.augment, state=state, rescale=self.rescale,
            jitter=self.jitter, modality_jitter=self.modality_jitter, modality_dropout=self.modality_dropout,
            modality_dropout_fill=self.modality_dropout_fill, seed=self.seed, rank=rank, world=world,
        )

    def with_state(self, state: StreamState) -> "PatchDataset":
        """The same dataset, continuing from ``state``."""
        return self._copy(state, self.rank, self.world)

    def for_rank(self, rank: int, world: int) -> "PatchDataset":
        """The share of rank ``rank`` of ``world``: its workers run streams of ``world x workers`` (:class:`StreamState`)."""
        return self._copy(self.state, rank, world)

    def _stream(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        state = self.state or StreamState.fresh(workers * self.world, self.world)
        if state.world != self.world or state.workers != workers:
            raise RuntimeError(f"dataset state is for {state.world} ranks x {state.workers} workers but runs in {self.world} x {workers}")
        stream = state.stream(self.rank, worker)
        return stream, state.streams, state.start[stream]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        stream, streams, start = self._stream()
        stats = {
            name: (np.asarray(s["mean"], dtype=np.float32), np.asarray(s["std"], dtype=np.float32))
            for name, s in self.band_stats.items()
        }
        m = self.margin
        for position, sample in enumerate(self.sampler.iter_stream(stream, streams, start), start):
            k = sample.dihedral if self.augment else 0
            inputs = {}
            for name in self.sampler.modalities:
                data = normalise(apply_dihedral(sample.data[name], k), *stats[name])
                inputs[name] = torch.from_numpy(np.ascontiguousarray(data))
            label = torch.from_numpy(np.ascontiguousarray(apply_dihedral(sample.label, k)).astype(np.int64))
            if self.augment and self.jitter:
                # its own generator, so the rescale draws stay those of a run without jitter
                rng = np.random.default_rng((self.seed, stream, position, 1))
                for name in self.sampler.modalities:
                    offsets = rng.normal(0.0, self.jitter, size=inputs[name].shape[0]).astype(np.float32)
                    inputs[name] += torch.from_numpy(offsets)[:, None, None]
            if self.augment and any(self.modality_jitter.values()):
                # one offset per modality, drawn in the model's modality order from a generator of its own
                rng = np.random.default_rng((self.seed, stream, position, 4))
                for name in self.sampler.modalities:
                    if name in self.modality_jitter:
                        inputs[name] += float(rng.normal(0.0, self.modality_jitter[name]))
            if self.augment and self.modality_dropout and len(inputs) > 1:
                # its own generator too: the flips, rescale and jitter draws stay those of a run without it
                rng = np.random.default_rng((self.seed, stream, position, 2))
                if rng.random() < self.modality_dropout:
                    dropped = inputs[self.sampler.modalities[int(rng.integers(len(inputs)))]]
                    if self.modality_dropout_fill == "noise":
                        dropped.copy_(torch.from_numpy(rng.standard_normal(dropped.shape, dtype=np.float32)))
                    else:
                        dropped.zero_()
            if self.augment and self.rescale is not None:
                # drawn from (seed, stream, position): the same sample gets the same rescale on resume
                rng = np.random.default_rng((self.seed, stream, position))
                inputs, label = rescale_and_crop(inputs, label, float(np.exp(rng.uniform(*np.log(self.rescale)))), rng)
            yield inputs, label[m : label.shape[0] - m, m : label.shape[1] - m]


def rescale_and_crop(
    inputs: dict[str, torch.Tensor], label: torch.Tensor, factor: float, rng: np.random.Generator
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rescale (C, P, P) ``inputs`` (bilinear) and (P, P) ``label`` (nearest) by ``factor``, then cut one
    P x P window at a random place: inside the rescaled patch when it is larger, around it (inputs 0, the
    normalised band mean; labels IGNORE) when it is smaller."""
    from tilefuse.scene import IGNORE

    size = label.shape[-1]
    scaled = max(1, int(round(size * factor)))
    if scaled == size:
        return inputs, label
    grown = {
        n: F.interpolate(v[None], size=(scaled, scaled), mode="bilinear", align_corners=False)[0] for n, v in inputs.items()
    }
    grown_label = F.interpolate(label[None, None].float(), size=(scaled, scaled), mode="nearest")[0, 0].long()
    if scaled > size:
        y, x = (int(v) for v in rng.integers(0, scaled - size + 1, size=2))
        return {n: v[:, y : y + size, x : x + size].contiguous() for n, v in grown.items()}, grown_label[y : y + size, x : x + size].contiguous()
    y, x = (int(v) for v in rng.integers(0, size - scaled + 1, size=2))
    out = {n: v.new_zeros(v.shape[0], size, size) for n, v in grown.items()}
    for n, v in grown.items():
        out[n][:, y : y + scaled, x : x + scaled] = v
    out_label = label.new_full((size, size), IGNORE)
    out_label[y : y + scaled, x : x + scaled] = grown_label
    return out, out_label
