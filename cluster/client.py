"""Turn a cluster spec into a ``distributed.Client``.

Specs:

- ``sync``: no cluster; blocks run one after another in this process (debugging, small notebooks);
- ``local:N`` (``local`` = one worker per core): a ``LocalCluster`` of N worker
  processes with one thread each; torch gets an even share of the cores per worker;
- ``cuda``: ``dask_cuda.LocalCUDACluster``, one worker per visible GPU (the ``gpu`` extra);
- ``tcp://host:port`` or a scheduler-file path: an existing cluster (``dask
  scheduler``/``dask worker`` by hand, dask-jobqueue on SLURM/PBS, the dask
  Kubernetes operator: see ``slurm.md`` and ``kubernetes.yaml`` here).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from tilefuse.errors import InputError

CONNECT_TIMEOUT = "5s"
SPECS = "sync, local:N, cuda, tcp://HOST:PORT or a scheduler file"


def _local_workers(spec: str) -> int:
    count = spec.partition(":")[2]
    if not count:
        return os.cpu_count() or 1
    if not count.isdigit() or int(count) < 1:
        raise InputError(f"bad cluster spec {spec!r}: write local:N with N >= 1 worker processes")
    return int(count)


def make_client(spec: str, timeout: str = CONNECT_TIMEOUT):
    """A ``distributed.Client`` for ``spec`` (see the module docstring), or None for ``sync``.

    Closing the client also closes a cluster it started (``local:N``, ``cuda``).
    """
    spec = spec.strip()
    if spec == "sync":
        return None
    from distributed import Client

    if spec == "local" or spec.startswith("local:"):
        workers = _local_workers(spec)
        # a Client given n_workers starts the LocalCluster and closes it with itself
        with _fast_malloc():
            return Client(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.WARNING,
            )
    if spec == "cuda":
        return _cuda_client()
    if spec.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        try:
            return Client(spec, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise InputError(f"cannot reach the dask scheduler at {spec} ({type(error).__name__}): start it or fix --cluster") from None
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise InputError(f"scheduler file {path} does not exist: start the scheduler with --scheduler-file {path}")
        try:
            return Client(scheduler_file=str(path), timeout=timeout)
        except (OSError, TimeoutError, ValueError) as error:
            raise InputError(f"cannot reach the dask scheduler of {path} ({type(error).__name__}): is it still running?") from None
    raise InputError(f"unknown cluster spec {spec!r}: use {SPECS}")


def _fast_malloc():
    """Dask config under which nannies spawn workers with glibc's default malloc tuning.

    Dask sets MALLOC_TRIM_THRESHOLD_ for workers, which makes torch about 2x
    slower on a CPU (see :data:`tilefuse.cluster.plugin.MALLOC_TRIM`).
    """
    import dask

    return dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def _cuda_client():
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise InputError("--cluster cuda needs dask-cuda: pip install 'tilefuse[gpu]' (or use local:N)") from None
    import torch
    from distributed import Client

    if not torch.cuda.is_available():
        raise InputError("--cluster cuda: no GPU is visible to torch on this machine; use --cluster local:N")
    with _fast_malloc():
        cluster = LocalCUDACluster(threads_per_worker=1, dashboard_address=":0", silence_logs=logging.WARNING)
    client = Client(cluster)
    # the Client did not start this cluster, so it would not close it: tie them together
    client._tilefuse_cluster = cluster
    return client


def close_client(client) -> None:
    """Close a client from :func:`make_client` and any cluster it started."""
    if client is None:
        return
    cluster = getattr(client, "_tilefuse_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


@contextlib.contextmanager
def cluster_client(spec_or_client) -> Iterator:
    """Context manager over :func:`make_client`; an existing Client passes through and stays open."""
    if spec_or_client is None or not isinstance(spec_or_client, str):
        yield spec_or_client
        return
    client = make_client(spec_or_client)
    try:
        yield client
    finally:
        close_client(client)


def workers_per_host(client) -> dict[str, int]:
    """Host -> number of workers on it, from the scheduler's view."""
    hosts = Counter(
        address.split("://")[-1].rsplit(":", 1)[0] for address in client.scheduler_info(n_workers=-1)["workers"]
    )
    return dict(hosts)


def dashboard_link(client) -> str | None:
    """The dashboard address, or None where the scheduler serves none (bokeh not installed)."""
    services = client.scheduler_info().get("services", {})
    return client.dashboard_link if "dashboard" in services else None
