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
address of this host). A ``listen`` no server could bind (another machine's
address, a name that does not resolve, a host with a port, an IPv6 address) is
refused in one line before anything starts, and a start that still fails to
bind is one line too.

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
import errno
import logging
import os
import socket
import struct
import threading
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


_LISTEN_ERRNOS = {errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EACCES, errno.EAFNOSUPPORT}
"""A server's bind failed for its address (what the fix of a bad ``listen`` fixes)."""
LISTEN_FIX = "give an address of this machine, e.g. 127.0.0.1 (this machine only, the default) or 0.0.0.0 (every interface)"


def _listen_error(listen: object, problem: str, fix: str = LISTEN_FIX) -> InputError:
    value = clipped(listen) if isinstance(listen, str) else listen
    return InputError(f"bad listen address {value!r} (--listen; Python: listen=): {problem}: {fix}")


def _check_listen(listen: str) -> str:
    """The host a cluster started here listens on, checked before anything starts: one line for a URL or path, a
    host with a port, an IPv6 address, a name that does not resolve, an address of another machine (each one
    failed deep in distributed's start, after a hundred lines of traceback)."""
    import ipaddress
    import re

    if not isinstance(listen, str):
        raise _listen_error(listen, f"a host is text, not {type(listen).__name__}")
    host = listen.strip()
    if not host or "://" in host or "/" in host:
        raise _listen_error(listen, "a host is expected (no URL, no path)")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        version = ipaddress.ip_address(bare).version
    except ValueError:
        version = None
    if version == 6:  # dask takes none for its dashboard (and wants brackets elsewhere)
        raise _listen_error(listen, "a cluster started here listens on IPv4 only", "give 127.0.0.1, 0.0.0.0 or an IPv4 address or name of this machine")
    if version is None and ":" in host:
        if re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]*):\d*", host):
            alone = host.rpartition(":")[0].strip("[]")
            alone = alone if alone and ":" not in alone else LOOPBACK  # not an IPv6 one, refused above
            raise _listen_error(
                listen, "it has a port, but the scheduler, workers and dashboard each take a free port of the host",
                f"write the host alone, e.g. --listen {clipped(alone)} (Python: listen={clipped(alone)!r})",
            )
        raise _listen_error(listen, "it is neither a host name nor an IPv4 address")
    _check_bindable(listen, host)
    return host


def _check_bindable(listen: str, host: str) -> None:
    """Refuse ``host`` unless each address it resolves to can be bound here, as tornado binds a server's sockets
    (:func:`tornado.netutil.bind_sockets`: every address of a name, the ``::1`` of localhost where IPv6 is off aside)."""
    try:
        found = socket.getaddrinfo(host, 0, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) and error.strerror else type(error).__name__
        raise _listen_error(listen, f"it is neither an IPv4 address nor a host name that resolves ({reason})") from None
    bound = []
    for family, kind, proto, _, address in sorted(set(found), key=lambda entry: entry[0]):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks (tornado skips it too)
        with sock:
            try:
                sock.bind(address)
            except OSError as error:
                if family == socket.AF_INET6 and host == "localhost" and error.errno == errno.EADDRNOTAVAIL:
                    continue
                named = address[0] if address[0] == host else f"it resolves to {address[0]}, which"
                if error.errno == errno.EADDRNOTAVAIL:
                    raise _listen_error(listen, f"{named} is not an address of this machine") from None
                raise _listen_error(listen, f"cannot listen on {address[0]} ({error.strerror or type(error).__name__})") from None
        bound.append(family)
    if socket.AF_INET not in bound:  # a name of IPv6 addresses only
        raise _listen_error(listen, "it names no IPv4 address of this machine", "give 127.0.0.1, 0.0.0.0 or an IPv4 address or name of this machine")


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

        threads = _task_threads(prefetch, workers, _local_device())
        with spawn_environ(), _start_failure_as_input_error(listen, host):
            return Client(
                n_workers=workers,
                threads_per_worker=threads,
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
    - What workers log of their cluster closing under them is not reported (:class:`_ClosingNoise`).
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(
        lambda record: not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")
    )
    _quiet_closing_noise(worker)
    from tilefuse.cluster.plugin import quiet_refused_setup

    quiet_refused_setup()
    with contextlib.suppress(ImportError):
        from numcodecs import blosc

        if getattr(blosc, "_MUTEX_IS_INIT", None) is False:  # numcodecs' lazy lock, not made yet
            blosc._MUTEX, blosc._MUTEX_IS_INIT = threading.Lock(), True


_RUN_STOPPED = threading.Event()
"""Set in a worker started here once the client stops its run on an error or interrupt (:func:`_stop_quietly`)."""


class _ClosingNoise(logging.Filter):
    """Drops, in a worker started here, what distributed logs of its cluster closing under it, once it closes or
    once the client stopped its run on an error or an interrupt (Ctrl-C, SIGTERM): 'Worker stream died during
    communication' and 'failed during get data' (a peer closed mid-transfer: ERROR, with a CommClosedError or
    ConnectionResetError traceback), an 'Async instruction ... ended with CancelledError' (a transfer or task cut
    by the close) and other tracebacks of a closed connection or a cancelled coroutine. Workers share the
    client's stderr: an interrupted ``tilefuse predict --cluster local:2`` printed 20-40 such lines before its
    one line. A running worker of an unstopped run still reports them (a peer that died mid-run), as it reports
    everything else; the error or interrupt itself is the client's one line."""

    def __init__(self, worker) -> None:
        import weakref

        super().__init__()
        self._worker = weakref.ref(worker)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("distributed") or record.levelno > logging.ERROR or not _closing_noise(record):
            return True
        worker = self._worker()
        status = getattr(getattr(worker, "status", None), "name", "closed")
        return not (_RUN_STOPPED.is_set() or status in ("closing", "closing_gracefully", "closed", "failed"))


def _closing_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is what a worker logs of a connection to a peer or its scheduler closing under it."""
    import asyncio

    text = str(record.msg)
    if text.startswith("Async instruction for") and text.endswith("ended with CancelledError"):
        return True
    if text.startswith(("Worker stream died during communication", "failed during get data with")):
        return True
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, (OSError, asyncio.CancelledError))  # CommClosedError, StreamClosedError, resets


def _quiet_closing_noise(worker) -> None:
    """Install :class:`_ClosingNoise` on the handlers that write this worker's distributed logs (once)."""
    handlers = logging.getLogger("distributed").handlers
    for handler in handlers:
        if not any(isinstance(f, _ClosingNoise) for f in handler.filters):
            handler.addFilter(_ClosingNoise(worker))


def _stop_quietly(dask_worker) -> None:
    """Run on each worker started here once the client stops its run on an error or interrupt (:func:`_stopping`)."""
    _quiet_closing_noise(dask_worker)  # the cuda cluster's workers run no dask_setup
    _RUN_STOPPED.set()


STOP_NOTICE_S = 2.0
"""Most seconds an interrupted run waits for its workers to hear that it stops, before it closes them anyway."""


def _stopping(client) -> None:
    """Tell the workers of a cluster started here that the run stops (an error, Ctrl-C, SIGTERM) before it is
    closed (:class:`_ClosingNoise`): a worker still running when a peer closes mid-transfer logged the peer's
    close as an error with a traceback. Waits at most :data:`STOP_NOTICE_S`; a cluster that does not answer
    (its scheduler lost) is closed all the same."""
    def tell() -> None:
        with contextlib.suppress(BaseException):  # a client closed meanwhile, a lost scheduler: nothing to tell
            client.run(_stop_quietly, on_error="ignore")

    teller = threading.Thread(target=tell, name="tilefuse-stopping", daemon=True)
    teller.start()
    teller.join(STOP_NOTICE_S)


class _UnmadeFutureCancel(logging.Filter):
    """Drops tornado's report of distributed's ``sync`` cancelling a future it had not made yet.

    A Ctrl-C that lands while the main thread waits in ``distributed.utils.sync`` (a gather, a client call)
    schedules its ``cancel``; where the coroutine has not yet made its future, that callback fails on the unbound
    name and tornado logs 'Exception in callback ... sync.<locals>.cancel' with a NameError traceback before
    tilefuse's 'interrupted' line (distributed 2026.11; harmless: there is nothing to cancel). Only that record is
    dropped: any other callback's error, or this one's of another kind, is reported as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        callback = record.args[0] if isinstance(record.args, tuple) and record.args else None
        name = getattr(getattr(callback, "func", callback), "__qualname__", "")
        error = record.exc_info[1] if record.exc_info else None
        return not (name == "sync.<locals>.cancel" and isinstance(error, NameError))


def _quiet_unmade_future_cancel() -> None:
    """Install :class:`_UnmadeFutureCancel` on tornado's callback logger (once per process)."""
    log = logging.getLogger("tornado.application")
    if not any(isinstance(f, _UnmadeFutureCancel) for f in log.filters):
        log.addFilter(_UnmadeFutureCancel())


def _local_device() -> str:
    """The device kind of workers started on this machine (:func:`tilefuse.cluster.plugin.load_runner` picks the GPU where one is visible)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _default_kept_on_failure() -> Iterator[None]:
    """Restore dask's default scheduler where the Client made in the block fails: a Client makes itself the
    default before it connects (or starts its cluster), and a failed one stayed so: every later dask computation
    of the process (an ingest in the same notebook) then went to a client that never was. A client whose cluster
    did not start is also closed here: left to its ``__del__`` at the interpreter's exit, it waited 60 s for its
    stopped event loop and printed a TimeoutError traceback."""
    import dask
    from distributed import client as dask_client

    default = {key: dask.config.config[key] for key in ("scheduler", "shuffle") if key in dask.config.config}
    before = set(map(id, dask_client._global_clients.values()))
    try:
        yield
    except BaseException:
        for key in ("scheduler", "shuffle"):
            dask.config.config.pop(key, None)
        dask.config.config.update(default)
        for failed in [c for c in dask_client._global_clients.values() if id(c) not in before]:
            with contextlib.suppress(Exception):  # distributed's internals: best effort
                dask_client._del_global_client(failed)
                failed.close(timeout=5)
        raise


class _NotStarted(logging.Filter):
    """Drops distributed's 'Cluster closed without starting up' warning: the failed start is reported in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Cluster closed without starting up")


@contextlib.contextmanager
def _start_failure_as_input_error(listen: str, host: str) -> Iterator[None]:
    """A cluster started here that cannot listen on ``host`` (what :func:`_check_listen` could not foresee: an
    address gone since, a name whose addresses changed) is one :class:`InputError` line naming ``listen``, not
    distributed's RuntimeError and its hundred lines of traceback. Other start failures pass unchanged."""
    spec_log = logging.getLogger("distributed.deploy.spec")
    quiet = _NotStarted()
    spec_log.addFilter(quiet)
    try:
        with _default_kept_on_failure():
            yield
    except (RuntimeError, OSError, ValueError) as error:
        cause = error if isinstance(error, OSError) else error.__cause__
        if not (isinstance(error, OSError) or str(error).startswith("Cluster failed to start")) or not isinstance(cause, (OSError, ValueError)):
            raise
        if isinstance(cause, socket.gaierror) or (isinstance(cause, OSError) and cause.errno in _LISTEN_ERRNOS):
            reason = cause.strerror or type(cause).__name__
            raise _listen_error(listen, f"the cluster could not listen on {host} ({reason})") from None
        if isinstance(cause, ValueError):  # distributed could not parse an address made of it
            raise _listen_error(listen, f"the cluster could not listen on {host} ({clipped(str(cause))})") from None
        raise  # not the address's fault (too many open files...): distributed's error as it is
    finally:
        spec_log.removeFilter(quiet)


def _connect(address: str, timeout: float | str, what: str):
    """A Client of the scheduler at ``address``, probed first where it is plain TCP."""
    import dask
    from distributed import Client

    seconds = _seconds(timeout)
    if address.startswith("tcp://"):
        probe_scheduler(address, seconds, what)
    elif not address.startswith("inproc://"):
        split_address(address)
    try:
        with _default_kept_on_failure(), dask.config.set({"distributed.comm.timeouts.connect": f"{seconds}s"}):
            return Client(address, timeout=f"{seconds}s")
    except (OSError, TimeoutError, TypeError, ValueError) as error:
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

    with spawn_environ(), _start_failure_as_input_error(host, host):
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
    _quiet_unmade_future_cancel()
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
    except BaseException:  # an error or an interrupt: the cluster started here closes under running tasks
        if client is not None and (client.cluster is not None or getattr(client, "_tilefuse_cluster", None) is not None):
            _stopping(client)
        raise
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
