"""Training samples drawn straight from scene stores: geometry apart from I/O.

Three samplers, each a short subclass of :class:`StoreSampler` (stores and
their readers, modalities, split, seed, pickling), yielding :class:`Sample`
(raw store values around one position) from one or more scene stores:

- :class:`RandomPatchSampler` (segmentation, PAD; :mod:`.random_patches`):
  patch origins uniform over the eligible positions of all stores (so stores
  weigh by valid area), with optional class balancing and a minimum labelled
  fraction; chunk-aware, each read window decoded once for several patches.
- :class:`LabelledPixelSampler` (S²Fin, few labels; :mod:`.labelled_pixels`):
  a fixed number of labelled pixels per class with their P x P neighbourhoods
  (reflect-padded at scene edges), drawn once per seed and replayed in a new
  order every epoch.
- :class:`GridPatchSampler` (validation; :mod:`.grid_patches`): every tile of
  a regular grid over a split, once.

Randomness is counter-based: the generator of round ``r`` of stream ``s`` is
seeded with ``(seed, s, r)``, so the sampler's whole RNG state is the number of
samples each stream has handed out (see :meth:`RandomPatchSampler.iter_stream`'s
``start``), which a checkpoint stores as plain JSON and a resumed run replays
exactly.

The rest: :mod:`.reader` (:class:`SceneReader`, a store's identity),
:mod:`.split` (:func:`spatial_split`, :class:`SpatialSplit`, the run's split
file), :mod:`.geometry` (pure window geometry), :mod:`.index` (saved indexes,
so a restart does not read every store's ``valid`` and ``label`` again).
"""

from tilefuse.sampling.base import DEFAULT_WINDOW, Sample, StoreSampler
from tilefuse.sampling.geometry import (
    aligned_window,
    box_sums,
    centre_classes,
    check_patch_fits,
    cover_counts,
    cut_reflect,
    eligible_origins,
    grid_origins,
    labelled_pixels,
    masked_label,
    window_blocks,
    window_geometry,
    window_starts,
)
from tilefuse.sampling.grid_patches import GridPatchSampler
from tilefuse.sampling.index import INDEX_DIR, IndexCache
from tilefuse.sampling.labelled_pixels import LabelledPixelSampler
from tilefuse.sampling.random_patches import RandomPatchSampler
from tilefuse.sampling.reader import SceneReader, Store, open_readers, store_identity
from tilefuse.sampling.split import (
    SPLIT_FILE,
    SUBSETS,
    SavedSplit,
    SpatialSplit,
    labelled_per_block,
    load_split,
    save_split,
    spatial_split,
    split_mask,
    split_sha256,
)

__all__ = [
    "DEFAULT_WINDOW", "INDEX_DIR", "SPLIT_FILE", "SUBSETS",
    "GridPatchSampler", "IndexCache", "LabelledPixelSampler", "RandomPatchSampler", "Sample", "SavedSplit",
    "SceneReader", "SpatialSplit", "Store", "StoreSampler",
    "aligned_window", "box_sums", "centre_classes", "check_patch_fits", "cover_counts", "cut_reflect",
    "eligible_origins", "grid_origins", "labelled_per_block", "labelled_pixels", "load_split", "masked_label", "open_readers",
    "save_split", "spatial_split", "split_mask", "split_sha256", "store_identity", "window_blocks", "window_geometry", "window_starts",
]
