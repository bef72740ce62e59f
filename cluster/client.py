"""Turn a cluster spec into a ``distributed.Client``.

Specs:

- ``sync``: no cluster; blocks run one after another in this process (debugging, small notebooks);
- ``local:N`` (``local`` = one worker per core): a ``LocalCluster`` of N worker
  processes; torch gets an even share of the cores per worker, and each worker
  one task thread that computes plus ``prefetch`` that read the next blocks
  (by default none for CPU workers, whose torch threads take every core of their share);
- ``cuda``: ``dask_cuda.LocalCUDACluster``, one worker per visible GPU (the ``gpu`` extra);
- ``tcp://host:port`` or a scheduler-file path: an existing cluster (``dask
  scheduler``/``dask worker`` by hand, dask-jobqueue on SLURM/PBS, the dask
  Kubernetes operator: see ``slurm.md`` and ``kubernetes.yaml`` here).

Servers: a cluster started here (``local:N``, ``cuda``) puts its scheduler,
workers and dashboard on ``listen`` (:data:`LOOPBACK` by default), so nothing
is reachable from other machines unless asked (``listen="0.0.0.0"`` or one
address of this host).

Connections: before a ``tcp://`` address (or a scheduler file's) is handed to
distributed, :func:`probe_scheduler` opens one socket with a bounded timeout
and reads the greeting a dask scheduler sends first (an 8-byte length, then
msgpack frames), with a bounded length. Anything else (an HTTP server that
waits for a request, a server that answers junk, whose first bytes distributed
would take for a frame length of exabytes) is refused in one line, as is a
closed port or an address without a port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from tilefuse.errors import InputError, clipped, read_json

CONNECT_TIMEOUT = 10.0
"""Seconds a connection to an existing scheduler may take, greeting included."""
LOOPBACK = "127.0.0.1"
GREETING_LIMIT = 1 << 20
"""Largest first message accepted from a scheduler: dask's greeting is a few hundred bytes."""
SPECS = "sync, local:N, cuda, tcp://HOST:PORT or a scheduler file"
DEFAULT_PORT = 8786
MAX_TIMEOUT = 86400.0
"""Longest connection timeout accepted, in seconds (a day): beyond that (or inf) it is a typo."""


def _local_workers(spec: str) -> int:
    """Worker processes of ``local[:N]``: N in 1..:data:`tilefuse.training.WORKERS_PER_CORE` x cores, else
    :class:`InputError` (each worker is a process holding a model: thousands would exhaust the machine first)."""
    from tilefuse.training import WORKERS_PER_CORE

    count = spec.partition(":")[2]
    cores = os.cpu_count() or 1
    if not count:
        return cores
    most = WORKERS_PER_CORE * cores
    if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= most:  # not '²', which int() refuses
        raise InputError(f"bad cluster spec {spec!r}: write local:N with N in 1..{most} worker processes ({cores} cores here)")
    return int(count)


def _seconds(timeout: float | str) -> float:
    """A timeout in seconds from a number or a dask duration string ("5s")."""
    if isinstance(timeout, str):
        from dask.utils import parse_timedelta

        try:
            timeout = parse_timedelta(timeout)
        except (ValueError, KeyError):
            raise InputError(f"bad timeout {timeout!r}: give seconds, e.g. timeout=10") from None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT:
        raise InputError(f"the connection timeout must be > 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout}: pass e.g. --connect-timeout 10")
    return float(timeout)


def _check_listen(listen: str) -> str:
    host = (listen or "").strip()
    if not host or "://" in host or "/" in host:
        raise InputError(f"bad listen address {listen!r}: give a host of this machine, e.g. 127.0.0.1 or 0.0.0.0")
    return host


def split_address(address: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``scheme://host:port``; an address without host or port is refused."""
    scheme, _, rest = address.partition("://")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, ""
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(
            f"{address!r} has no {'host' if not host else 'valid port'}: write {scheme}://HOST:PORT "
            f"(dask schedulers listen on {DEFAULT_PORT} by default)"
        )
    return scheme, host, int(port)


def _recv_exact(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(min(count - got, 1 << 16))
        if not chunk:
            raise ConnectionResetError("closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _is_greeting(payload: bytes) -> bool:
    """Whether ``payload`` (one message body) is a dask handshake: msgpack frames whose header decodes."""
    import msgpack
    from distributed.protocol.utils import unpack_frames

    try:
        frames, missing = unpack_frames(payload, partial=True)
        if missing or not frames:
            return False
        header = msgpack.loads(frames[0], raw=False, use_list=False, strict_map_key=False)
    except Exception:  # anything that is not dask's framing
        return False
    return isinstance(header, dict)


def probe_scheduler(address: str, timeout: float | str = CONNECT_TIMEOUT, what: str = "the server") -> None:
    """Check that a dask scheduler answers at ``tcp://host:port`` within ``timeout`` s, else :class:`InputError`.

    Opens one connection, reads the scheduler's greeting with a bounded length
    and closes it; never sends anything.
    """
    scheme, host, port = split_address(address)
    seconds = _seconds(timeout)
    fix = f"check the address (a dask scheduler's, e.g. tcp://HOST:{DEFAULT_PORT})"
    if what != "the server":  # a scheduler file's address: the file may outlive its scheduler
        fix = "start the scheduler again (it rewrites the file) or pass the file of one that runs"
    deadline = time.monotonic() + seconds
    try:
        sock = socket.create_connection((host, port), timeout=seconds)
    except socket.gaierror:
        raise InputError(f"cannot resolve host {host!r} of {address}: {fix}") from None
    except (TimeoutError, socket.timeout):
        raise InputError(f"no connection to {_named(address, what)} within {seconds:g} s: {_start_or(fix, what)}") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(f"cannot connect to {_named(address, what)} ({reason}): {_start_or(fix, what)}") from None
    with sock:
        try:
            (length,) = struct.unpack("Q", _recv_exact(sock, 8, deadline))
            if not 0 < length <= GREETING_LIMIT:
                raise ValueError(f"its first message claims {length} bytes")
            if not _is_greeting(_recv_exact(sock, length, deadline)):
                raise ValueError("its first message is not dask's handshake")
        except (TimeoutError, socket.timeout):
            reason = f"it sent no dask greeting within {seconds:g} s"
        except OSError as error:
            reason = f"it {error.args[0] if isinstance(error, ConnectionResetError) and error.args else 'dropped the connection'}"
        except ValueError as error:
            reason = str(error)
        else:
            return
    raise InputError(f"{what} at {address} is not a dask scheduler ({reason}): {fix}")


def _named(address: str, what: str) -> str:
    return address if what == "the server" else f"{what} at {address}"


def _start_or(fix: str, what: str) -> str:
    return f"start the scheduler or {fix}" if what == "the server" else f"the file names a scheduler that does not answer: {fix}"


def read_scheduler_file(path: Path) -> str:
    """The scheduler address in a dask scheduler file (JSON with ``"address"``), or :class:`InputError`."""
    fix = "pass the file `dask scheduler --scheduler-file` wrote"
    info = read_json(path, "scheduler file", fix, missing=f"start the scheduler with --scheduler-file {path}")
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or "://" not in address:
        raise InputError(f"scheduler file {path} has no \"address\" of a scheduler: {fix}")
    return address


def _task_threads(prefetch: int | None, workers: int, device: str) -> int:
    """Task threads per worker of a cluster started here: one computes, ``prefetch`` read ahead
    (by default none on a CPU, where torch gets every core of the worker's share)."""
    from tilefuse.cluster.blocks import task_threads

    return task_threads(prefetch, cores=max(1, (os.cpu_count() or 1) // workers), device=device)


def make_client(spec: str, timeout: float | str = CONNECT_TIMEOUT, listen: str = LOOPBACK, prefetch: int | None = None):
    """A ``distributed.Client`` for ``spec`` (see the module docstring), or None for ``sync``.

    ``timeout`` (seconds) bounds connecting to an existing scheduler; ``listen``
    is the host a cluster started here binds its scheduler, workers and
    dashboard to (loopback by default; ``"0.0.0.0"`` exposes them on every
    interface). Workers started here (``local:N``, ``cuda``) get ``1 + prefetch``
    task threads, so each reads ``prefetch`` blocks ahead while it computes one
    (default :func:`tilefuse.cluster.blocks.task_threads` of its share of the
    cores and its device); an existing cluster keeps its workers' threads. Closing the client
    also closes a cluster it started.
    """
    if not isinstance(spec, str):
        raise InputError(f"bad cluster spec {spec!r}: use {SPECS}")
    spec = spec.strip()
    if spec == "sync":
        return None
    from distributed import Client

    if spec == "local" or spec.startswith("local:"):
        workers = _local_workers(spec)
        host = _check_listen(listen)
        # a Client given n_workers starts the LocalCluster and closes it with itself
        from tilefuse.cluster.malloc import spawn_environ

        with spawn_environ():
            return Client(
                n_workers=workers,
                threads_per_worker=_task_threads(prefetch, workers, _local_device()),
                processes=True,
                host=host,
                dashboard_address=f"{host}:0",
                silence_logs=logging.WARNING,
                # dask_setup below, in each worker, after the user's own preloads (the argument replaces dask's setting)
                preload=[*_config_list("distributed.worker.preload"), __name__],
            )
    if spec == "cuda":
        return _cuda_client(_check_listen(listen), prefetch)
    scheme, sep, rest = spec.partition("://")
    if sep and scheme.lower() in ("tcp", "tls", "ucx", "inproc"):
        # TCP://HOST:PORT/ as copied from a browser's address bar is the scheduler at HOST:PORT
        return _connect(f"{scheme.lower()}://{rest.rstrip('/')}", timeout, what="the server")
    if sep:
        raise InputError(f"unknown cluster spec {spec!r}: use {SPECS}")
    from tilefuse.outputs import local_path

    path = local_path(spec, "scheduler file")  # ~ is the home folder (--cluster=~/scheduler.json, or Python)
    if path.suffix == ".json" or path.is_file():
        return _connect(read_scheduler_file(path), timeout, what=f"the scheduler of {path}")
    hint = ""
    if spec.rpartition(":")[2].isdigit() and "/" not in spec:  # HOST:PORT without its scheme
        hint = f" (a scheduler's address is written tcp://{spec})"
    raise InputError(f"unknown cluster spec {spec!r}{hint}: use {SPECS}")


def _config_list(key: str) -> list:
    import dask

    value = dask.config.get(key, None) or []
    return [value] if isinstance(value, str) else list(value)


def dask_setup(worker) -> None:
    """Run by each worker of a ``local:N`` cluster as it starts (dask's preload).

    - It ignores SIGINT. Ctrl-C in a terminal sends SIGINT to the whole foreground process group, workers
      included: each one died with a KeyboardInterrupt traceback (two dozen lines per worker, around
      'tilefuse: interrupted'), and the scheduler warned about the results they lost. The interrupt is the
      client's to handle: it cancels the blocks and closes the cluster, which stops the workers.
    - Blosc's decoding lock is a thread lock. numcodecs makes it a ``multiprocessing.Lock`` (a named
      semaphore this process's resource tracker, shared with the workers, cleans up): a worker killed
      (out of memory) left it, and the client's exit printed 'resource_tracker: There appear to be 1 leaked
      semaphore objects' after the run's one line. Within one worker the two are the same lock.
    - A heartbeat that meets the scheduler closed is not reported: the scheduler runs in the client's
      process, so it is closing (the run ended, or was interrupted), and a worker's 'Failed to communicate
      with scheduler during heartbeat' with its OSError traceback (a race of the close, seen once in a loaded
      run) was the last thing on the client's stderr.
    - A model that cannot load for bad input (the checkpoint rewritten since the run recorded its hash) is not
      reported with a traceback (:func:`tilefuse.cluster.plugin.quiet_refused_setup`): the error reaches the
      client, whose run ends in one line naming it.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(
        lambda record: not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")
    )
    from tilefuse.cluster.plugin import quiet_refused_setup

    quiet_refused_setup()
    with contextlib.suppress(ImportError):
        from numcodecs import blosc

        if getattr(blosc, "_MUTEX_IS_INIT", None) is False:  # numcodecs' lazy lock, not made yet
            blosc._MUTEX, blosc._MUTEX_IS_INIT = threading.Lock(), True


def _local_device() -> str:
    """The device kind of workers started on this machine (:func:`tilefuse.cluster.plugin.load_runner` picks the GPU where one is visible)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _connect(address: str, timeout: float | str, what: str):
    """A Client of the scheduler at ``address``, probed first where it is plain TCP."""
    import dask
    from distributed import Client

    seconds = _seconds(timeout)
    if address.startswith("tcp://"):
        probe_scheduler(address, seconds, what)
    elif not address.startswith("inproc://"):
        split_address(address)
    # a Client makes itself dask's default scheduler before it connects, and a failed one stays so: every later
    # dask computation of the process (an ingest in the same notebook) then went to a client that never was
    default = {key: dask.config.config[key] for key in ("scheduler", "shuffle") if key in dask.config.config}
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{seconds}s"}):
            return Client(address, timeout=f"{seconds}s")
    except (OSError, TimeoutError, TypeError, ValueError) as error:
        for key in ("scheduler", "shuffle"):
            dask.config.config.pop(key, None)
        dask.config.config.update(default)
        if isinstance(error, (OSError, TimeoutError)):
            raise InputError(f"cannot connect to the dask scheduler at {address} ({type(error).__name__}): start it or check the address") from None
        raise InputError(  # tls:// without its certificates, an inproc:// of another process, no ucx
            f"cannot connect to the dask scheduler at {address} ({type(error).__name__}: {clipped(str(error))}): "
            "tilefuse connects over plain tcp://; for tls://, ucx:// or inproc:// make the Client yourself and pass it as cluster="
        ) from None


def _cuda_client(host: str = LOOPBACK, prefetch: int | None = None):
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise InputError("--cluster cuda needs dask-cuda: pip install 'tilefuse[gpu]' (or use local:N)") from None
    import torch
    from distributed import Client

    if not torch.cuda.is_available():
        raise InputError("--cluster cuda: no GPU is visible to torch on this machine; use --cluster local:N")
    threads = _task_threads(prefetch, torch.cuda.device_count(), "cuda")
    from tilefuse.cluster.malloc import spawn_environ

    with spawn_environ():
        cluster = LocalCUDACluster(
            host=host, threads_per_worker=threads, dashboard_address=f"{host}:0", silence_logs=logging.WARNING
        )
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
def cluster_client(spec_or_client, timeout: float | str = CONNECT_TIMEOUT, listen: str = LOOPBACK, prefetch: int | None = None) -> Iterator:
    """Context manager over :func:`make_client`; an existing Client passes through and stays open.

    Anything else (a number, a LocalCluster rather than its Client...) is one InputError line naming ``cluster=``.
    """
    if spec_or_client is None or not isinstance(spec_or_client, str):
        from distributed import Client

        if spec_or_client is not None and not isinstance(spec_or_client, Client):
            raise InputError(
                f"cluster= is {type(spec_or_client).__name__}, neither a spec (sync, local:N, cuda, tcp://HOST:PORT, a scheduler "
                "file) nor a distributed.Client: pass one of those (for a LocalCluster, its Client(cluster))"
            )
        yield spec_or_client
        return
    client = make_client(spec_or_client, timeout=timeout, listen=listen, prefetch=prefetch)
    try:
        yield client
    finally:
        close_client(client)


def host_of(address: str) -> str:
    """The host of a worker address ``scheme://host:port``."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def workers_per_host(client) -> dict[str, int]:
    """Host -> number of workers on it, from the scheduler's view (the first thing asked of a user's Client: a
    closed one, or one whose cluster was closed, is one line here, not a RuntimeError or KeyError)."""
    try:
        if client.status in ("closing", "closed"):
            raise RuntimeError("the client is closed")
        workers = client.scheduler_info(n_workers=-1)["workers"]
    except Exception as error:
        raise InputError(
            f"the dask Client passed as cluster= cannot reach its scheduler ({type(error).__name__}: {clipped(str(error))}): "
            "pass an open Client of a running cluster, or a spec such as local:2"
        ) from None
    return dict(Counter(host_of(address) for address in workers))


def dashboard_link(client) -> str | None:
    """The dashboard address, or None where the scheduler serves none (bokeh not installed)."""
    services = client.scheduler_info().get("services", {})
    return client.dashboard_link if "dashboard" in services else None
