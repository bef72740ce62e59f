"""Data-parallel training over processes and GPUs: a rank's place in the job, its process group, local launch.

A job is ``world`` processes (ranks), started by ``torchrun`` (which sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) or on one machine by :func:`launch_local` (``tilefuse train
--nproc N``), which sets the same variables. Where none is set the process is a
job of one and nothing here touches ``torch.distributed``.

Contract:

- **Backend and device.** NCCL where the rank trains on CUDA, gloo otherwise
  (:func:`backend_for`); a CUDA rank uses ``cuda:LOCAL_RANK``
  (:func:`rank_device`).
- **One writer.** Rank 0 alone creates outputs (run folder, lock, checkpoints,
  logs, curves); other ranks only read (:attr:`Ranks.writer`). Every rank reads
  the run folder on resume, so on several machines it lies on a shared filesystem.
- **No hang.** Collectives time out after :func:`timeout` (``TILEFUSE_DDP_TIMEOUT``
  seconds, default 600); :func:`process_group` destroys the group when the block
  ends, also by an error; a peer that dies closes its connections, so the others
  fail at their next collective instead of waiting. :func:`launch_local` ends
  every rank as soon as one fails and returns that rank's exit status; a rank
  gets SIGTERM when its launcher dies, also by SIGKILL.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from tilefuse.errors import InputError
from tilefuse.signals import terminate_as_exit, terminating  # noqa: F401 (terminating: the launcher's callers)

ENV_TIMEOUT = "TILEFUSE_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world``, ``local_rank`` of ``local_world`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launched: bool = False
    """Started by torchrun or :func:`launch_local` (a process group is set up, also for a world of 1)."""

    @property
    def writer(self) -> bool:
        """Whether this rank writes outputs (rank 0 only)."""
        return self.rank == 0


def from_env(env: Mapping[str, str] = os.environ) -> Ranks:
    """The job this process belongs to, from torchrun's variables (none set: a job of one)."""
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return Ranks()
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        raise InputError(
            f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}: set both to whole numbers (torchrun does) or neither"
        ) from None
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < local_world):
        raise InputError(f"RANK={rank} does not fit WORLD_SIZE={world} (LOCAL_RANK={local_rank} of {local_world}): launch with torchrun")
    return Ranks(rank, world, local_rank, local_world, launched=True)


def backend_for(device: torch.device) -> str:
    """The process-group backend for ranks training on ``device``: NCCL on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA in a launched job, ``device`` otherwise."""
    if device.type != "cuda" or not ranks.launched:
        return device
    if device.index is not None and ranks.local_world > 1:
        raise InputError(f"device={str(device)!r} names one GPU for {ranks.local_world} ranks on this machine: pass device='cuda' (rank i takes cuda:LOCAL_RANK)")
    return device if device.index is not None else torch.device("cuda", ranks.local_rank)


def rank_threads(cores: int, ranks: Ranks, env: Mapping[str, str] = os.environ) -> int:
    """Default torch threads of a launched rank: ``OMP_NUM_THREADS`` where set (torchrun sets 1 for
    several ranks a machine, :func:`launch_local` its ``threads``), else the machine's ``cores`` shared by its ranks."""
    value = env.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return max(1, cores // ranks.local_world)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank ``rank`` > 0 (dropout and other model noise differ between ranks; rank 0 keeps ``seed``'s stream)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


def timeout() -> datetime.timedelta:
    """How long a collective waits for its peers: ``TILEFUSE_DDP_TIMEOUT`` seconds, default 600."""
    value = os.environ.get(ENV_TIMEOUT, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"{ENV_TIMEOUT}={value!r} must be a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


class Group:
    """The collectives training needs, over the job's process group (a job of one: identities, no communication)."""

    def __init__(self, ranks: Ranks, device: torch.device) -> None:
        self.ranks = ranks
        self.device = device
        self.active = ranks.launched and dist.is_initialized()

    def sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``array`` over the ranks (int64 or float64, any shape)."""
        if not self.active:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def mean(self, value: float) -> float:
        """Mean of a number over the ranks."""
        return float(self.sum(np.array([value], np.float64))[0]) / self.ranks.world

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, on the CPU."""
        if not self.active:
            return [tensor]
        local = tensor.to(self.device)
        out = [torch.empty_like(local) for _ in range(self.ranks.world)]
        dist.all_gather(out, local)
        return [t.cpu() for t in out]

    def barrier(self) -> None:
        if self.active:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Group]:
    """Join the job's process group for the block (env:// rendezvous; nothing for a job of one); destroyed after, also on error."""
    if not ranks.launched or dist.is_initialized():
        yield Group(ranks, device)
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise InputError(f"{name} is not set: launch with torchrun (or tilefuse train --nproc N), which sets the rendezvous")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), rank=ranks.rank, world_size=ranks.world, timeout=timeout(),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        yield Group(ranks, device)
    finally:
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """``model.compute_loss`` as a forward, so DistributedDataParallel sees (and synchronises) the loss computation."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs, target):
        return self.model.compute_loss(inputs, target)


def wrap(model: torch.nn.Module, group: Group) -> torch.nn.Module:
    """The module whose ``(inputs, target)`` forward gives the training loss: DDP-wrapped in a launched job.

    Gradients are averaged over the ranks in backward, so with a per-rank batch
    of B the step is that of one process over a global batch of B x world.
    """
    loss = LossModule(model)
    if not group.active:
        return loss
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # depthwise convolutions give weight grads (C, 1, k, k) whose size-1 dim has another stride than the
    # bucket's: the same memory layout, yet torch warns once per rank that it "may impair performance"
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    return DistributedDataParallel(loss, device_ids=[group.device.index] if group.device.type == "cuda" else None)


# ------------------------------------------------------------------ local launch


AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
"""Set to ``True`` (as torchrun does), every rank is a client of a rendezvous store its launcher serves."""


def rank_env(rank: int, nproc: int, port: int, threads: int | None = None) -> dict[str, str]:
    """The variables torchrun sets for local rank ``rank`` of ``nproc`` on one machine, rendezvous on loopback ``port``."""
    env = {
        "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check_nproc(nproc) -> int:
    """``nproc`` if it is a whole number of processes this machine can hold: 1..:data:`tilefuse.training.WORKERS_PER_CORE`
    x cores (each rank is a process holding a model, its optimiser and its DataLoader: --nproc 1000 started
    processes until the machine gave up), else :class:`InputError` naming it."""
    from tilefuse.training import WORKERS_PER_CORE

    cores = os.cpu_count() or 1
    most = WORKERS_PER_CORE * cores
    if isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= most:
        raise InputError(f"nproc= (--nproc) must be a whole number of processes in 1..{most} ({cores} cores here), got {nproc!r}")
    return nproc


def _killed_line(rank: int, nproc: int, code: int, hint: str) -> bytes:
    """The one line for a rank that a signal ended without a word (SIGKILL: the OOM killer, a user's kill)."""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    why = " (out of memory? or a kill)" if -code == signal.SIGKILL else ""
    return f"tilefuse: error: rank {rank} of the {nproc} processes was killed by {name}{why}, so the job stopped{hint}\n".encode()


def launch_local(
    command: Sequence[str], nproc: int, *, threads: int | None = 1, env: Mapping[str, str] | None = None, grace_s: float = 10.0,
    killed_hint: str = "",
) -> int:
    """Run ``command`` as ``nproc`` ranks of one job on this machine; returns the job's exit status.

    Each rank gets torchrun's variables (:func:`rank_env`, rendezvous on a loopback
    port this process serves the job's store on, :data:`AGENT_STORE`) and ``OMP_NUM_THREADS=threads``. Rank 0's stdout and stderr
    are this process's (its stderr passed on line by line); the other ranks'
    stdout is dropped and their stderr kept. When a rank fails, the others are
    stopped (SIGTERM, then SIGKILL after ``grace_s``), only the first failing
    rank's stderr is shown, and not where rank 0 printed each of its lines
    already (so an error every rank meets is printed once), and its status is returned (a rank killed by a signal: 128 + the signal number).
    A rank a signal ended without a word (SIGKILL) gets one line naming it and the signal, then ``killed_hint``.
    """
    check_nproc(nproc)
    # the rendezvous store is served from here, on a port the OS gives it and held for the whole job, and every
    # rank connects to it as torchrun's agent store: a port picked free and bound later by rank 0 could be taken
    # in between (by another job's rank 0: two trainings at once), failing the job or joining the other's ranks
    store = dist.TCPStore("127.0.0.1", 0, nproc, is_master=True, wait_for_workers=False, timeout=timeout())
    port = store.port
    base = {**os.environ, **(env or {}), AGENT_STORE: "True"}
    exits: queue.Queue[int] = queue.Queue()
    failing = threading.Event()
    held: list[bytes] = []  # rank 0's stderr after another rank failed
    shown: set[bytes] = set()  # rank 0's stderr lines passed on
    logs: list = []
    procs: list[subprocess.Popen] = []

    def forward(stream) -> None:
        for line in iter(stream.readline, b""):
            if failing.is_set():
                held.append(line)
            else:
                shown.add(line.strip())
                sys.stderr.buffer.write(line)
                sys.stderr.flush()

    def wait(rank: int) -> None:
        procs[rank].wait()
        exits.put(rank)

    readers = []
    die_with_launcher = _die_with_launcher()
    restore = terminate_as_exit()
    try:
        for rank in range(nproc):
            log = subprocess.PIPE if rank == 0 else tempfile.TemporaryFile()
            logs.append(log)
            procs.append(subprocess.Popen(
                list(command), env={**base, **rank_env(rank, nproc, port, threads)},
                stdout=None if rank == 0 else subprocess.DEVNULL, stderr=log, start_new_session=True,
                preexec_fn=die_with_launcher,
            ))
        readers.append(threading.Thread(target=forward, args=(procs[0].stderr,), daemon=True))
        readers += [threading.Thread(target=wait, args=(rank,), daemon=True) for rank in range(nproc)]
        for thread in readers:
            thread.start()
        failed = None
        for _ in range(nproc):
            rank = exits.get()
            if procs[rank].returncode != 0:
                failed = rank
                failing.set()
                break
        _stop(procs, grace_s)
        readers[0].join(grace_s)  # EOF once the rank and its children are gone
        if failed is None:
            return 0
        if failed == 0:
            out = b"".join(held)
        else:
            logs[failed].seek(0)
            out = logs[failed].read()
            if all(line.strip() in shown for line in out.splitlines()):
                out = b""  # an error every rank met: rank 0 printed it already
        code = procs[failed].returncode
        if code < 0 and not out.strip():  # nothing said: the job ended without a line
            out = _killed_line(failed, nproc, code, killed_hint)
        sys.stderr.buffer.write(out)
        sys.stderr.flush()
        return 128 - code if code < 0 else code
    finally:
        _stop(procs, grace_s)
        if readers:  # rank 0's last lines (its progress bar closed as it stopped) before the caller's
            readers[0].join(grace_s)
        del store
        restore()
        for log in logs:
            if log is not subprocess.PIPE:
                log.close()


def _die_with_launcher() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a rank get SIGTERM when its launcher dies (Linux; elsewhere None).

    A launcher killed by SIGKILL (the OOM killer, a notebook kernel's restart) stops nothing: its ranks,
    each in a session of its own, went on training and held the run folder's lock. The kernel's
    parent-death signal is tied to the launching thread, which waits in :func:`launch_local` until the
    ranks are stopped. libc is looked up here: the forked child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    launcher = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != launcher:  # the launcher died before the call
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


_PR_SET_PDEATHSIG = 1


class JobFailed(RuntimeError):
    """A job of several processes ended with a failing rank (its stderr was shown); ``code`` is its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"a rank of the training job exited with status {code} (its message is above)")
        self.code = code


ENV_ERRORS = "TILEFUSE_RANK_ERRORS"
"""Folder where a rank of :func:`launch_call` leaves its :class:`InputError` (a file named by its rank)."""


def launch_call(target: str, kwargs: Mapping, nproc: int, *, threads: int | None = 1) -> None:
    """Call ``target`` (``"module:function"``) with the JSON-ready ``kwargs`` in ``nproc`` ranks on this machine.

    Each rank runs ``python -m tilefuse.distributed`` (:func:`_rank_main`). A job
    ended by a rank's :class:`InputError` raises that InputError here, as the
    call in one process would (the CLI prints it once); other failures raise
    :class:`JobFailed` with the first failing rank's status.
    """
    spec = json.dumps({"target": target, "kwargs": dict(kwargs)})
    with tempfile.TemporaryDirectory(prefix="tilefuse-ranks-") as errors:
        code = launch_local(
            [sys.executable, "-m", "tilefuse.distributed", spec], nproc, threads=threads, env={ENV_ERRORS: errors},
            killed_hint=": rerun with resume=True (--resume) and the same nproc= (--nproc) to go on from its last checkpoint",
        )
        messages = [open(os.path.join(errors, name)).read() for name in sorted(os.listdir(errors), key=int)]
    if code == 2 and messages:
        raise InputError(messages[0])
    for message in dict.fromkeys(messages):  # a rank's error, though another failure ended the job first
        print(f"tilefuse: error: {message}", file=sys.stderr)
    if code:
        raise JobFailed(code)


def _rank_main(spec: str) -> int:
    """One rank of :func:`launch_call`."""
    call = json.loads(spec)
    module, name = call["target"].split(":")
    terminate_as_exit()  # the launcher stops a rank by SIGTERM: it ends by SystemExit, giving back what it holds
    try:
        getattr(importlib.import_module(module), name)(**call["kwargs"])
    except InputError as error:
        folder = os.environ.get(ENV_ERRORS)
        if folder:  # the launcher raises it (a notebook gets the InputError, not a RuntimeError and a printed line)
            with open(os.path.join(folder, os.environ.get("RANK", "0")), "w") as handle:
                handle.write(str(error))
        else:
            print(f"tilefuse: error: {error}", file=sys.stderr)
        return 2
    return 0


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM each rank of ``procs`` still running, which then stops what it started (DataLoader workers, their
    forkserver) and gives back what it holds (:func:`terminate_as_exit`); SIGKILL the process group of each rank
    still running after ``grace_s``, and SIGTERM what is left of the group of one that ended (children of a rank
    that could not stop them). (SIGTERM to the whole group at once killed the rank mid-write, leaving its lock,
    a half-written checkpoint folder and a 'leaked semaphore objects' warning per rank.)"""

    def signal_group(p: subprocess.Popen, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)

    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(p, signal.SIGKILL)
            p.wait()
        signal_group(p, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
