"""glibc malloc settings for processes that run blocks (dask workers and ``sync`` runs); no-ops elsewhere.

A block allocates and frees a few hundred MB of arrays (its input window, the
band sums, spill strips) from several threads (the task thread, zarr's
decoding threads, reader threads). Three settings keep that fast and keep the
resident memory a function of the block size, not of the scene:

- **One arena** (:func:`single_arena`, ``MALLOC_ARENA_MAX=1`` for workers
  tilefuse spawns). glibc gives each thread its own arena; memory freed in one
  arena serves only that arena's thread, so each arena grows to the largest
  block its thread ever saw and a worker's peak crept up block after block:
  near-free model, ``local:1``, peak RSS 742 / 730 / 774 MB on a 4,096^2 scene
  and 975 / 988 / 976 MB on 8,192^2 with glibc's default, 638 / 634 / 647 and
  804 / 807 / 810 MB with one arena, same speed (4.5-5.7 s and 13.7-17.7 s with
  the default, 4.1-5.4 s and 14.5-15.5 s with one; 2-core machine, two niced
  trainings running). Not yet measured on a many-core GPU box, where many
  reader threads share the one arena's lock: set ``MALLOC_ARENA_MAX`` there to
  compare. A variable the user set wins.
- **No fixed trim threshold** (:data:`MALLOC_TRIM`, :func:`malloc_trim_workers`).
  Dask's nannies set ``MALLOC_TRIM_THRESHOLD_``; any explicit value turns off
  glibc's dynamic mmap threshold, so every large tensor is a fresh mmap and torch
  on a CPU runs about 2x slower. Workers tilefuse starts never get it; the
  workers of a borrowed cluster (``tcp://``, a scheduler file, a Client) are
  counted and named, never restarted: a restart is the cluster owner's to make
  (it dropped another client's state and broke a second prediction on the same
  cluster mid-setup with a CommClosedError traceback).
- **A trim between blocks** (:func:`trim_memory`) hands the previous block's
  freed heap back to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from functools import lru_cache
from typing import Iterator

MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
"""Set by dask's nannies for the workers they spawn; tilefuse's workers run without it."""
MALLOC_ARENAS = "MALLOC_ARENA_MAX"
_M_ARENA_MAX = -8
"""mallopt's parameter number of M_ARENA_MAX (glibc >= 2.10)."""


@lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def single_arena() -> bool:
    """Make threads started from now on allocate from glibc's main arena, unless ``MALLOC_ARENA_MAX`` is set.

    Threads that have allocated already keep their arena. Returns whether the setting was made.
    """
    libc = _libc()
    if MALLOC_ARENAS in os.environ or libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


@contextlib.contextmanager
def spawn_environ() -> Iterator[None]:
    """Dask config under which nannies spawn workers with one malloc arena and no fixed trim threshold.

    :data:`MALLOC_TRIM` is also out of this process's environment meanwhile: dask's nannies write their
    pre-spawn variables into the environment of the process that starts them, so a cluster started earlier in
    the same process (a notebook's own LocalCluster, a test) left it there, and the workers started here
    inherited it (torch at half speed, reported as a borrowed cluster's). A worker a nanny restarts later
    inherits the environment of that moment.
    """
    import dask

    settings = {f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None}
    if MALLOC_ARENAS not in os.environ:  # the user's value is inherited as it is
        settings[f"distributed.nanny.pre-spawn-environ.{MALLOC_ARENAS}"] = 1
    left = os.environ.pop(MALLOC_TRIM, None)
    try:
        with dask.config.set(settings):
            yield
    finally:
        if left is not None:
            os.environ[MALLOC_TRIM] = left


def _has_malloc_trim() -> bool:
    return MALLOC_TRIM in os.environ


def malloc_trim_workers(client) -> int:
    """How many of ``client``'s workers run with :data:`MALLOC_TRIM` set (slower torch on a CPU).

    They are left as they are: the cluster is borrowed, and restarting its workers would drop what other
    clients hold there and break their runs (a second ``tilefuse predict`` on the same cluster).
    """
    return sum(1 for flag in client.run(_has_malloc_trim).values() if flag)
