"""The training loop: AdamW + per-iteration cosine, AMP on GPU, checkpoints that resume exactly.

A run directory holds::

    model.safetensors, config.json   the latest checkpoint (``tilefuse predict --checkpoint RUN``)
    state/                           everything a resume needs, replaced atomically:
        model.safetensors, config.json   (the same checkpoint)
        trainer.safetensors              optimiser moments, RNG states (and the raw weights when
                                         ``ema_decay`` > 0: the checkpoint then holds the EMA weights)
        trainer.json                     step, job, optimiser/scheduler scalars, sampler stream state, the
                                         computation (device kind, AMP, threads), the losses not logged yet
                                         (``log_window``), checksums of the other files
    split.json, index/               the split and the sampler indexes (:meth:`tilefuse.training_data.TrainingData.save`);
                                     the job in trainer.json records the split file's SHA-256, so a resume
                                     refuses an edited split file (:meth:`RunDir.check_split`)
    log.jsonl                        one JSON object per logged step and per validation
    curves.png, metrics.json         written when the run completes

Nothing is pickled: tensors go to safetensors, everything else to JSON.
Resuming restores weights, optimiser, scheduler, torch RNG and the sampler
streams, so the losses after a resume equal those of an uninterrupted run, and so
does ``log.jsonl``: its loss averages the steps since the previous record, and the
state keeps the steps of that window already run.

``ema_decay`` > 0 keeps an exponential moving average of the weights (and
floating buffers), updated after every optimiser step with the decay
``min(ema_decay, (1 + step) / (10 + step))`` (short runs are not pulled back to
the initial weights). Validation and every checkpoint use the averaged weights;
the raw ones go into the trainer state, so a resume stays exact.

Data-parallel (:mod:`tilefuse.distributed`): launched by ``torchrun`` or
``tilefuse train --nproc N``, every rank calls :func:`fit`. Each rank trains a
DistributedDataParallel replica on ``batch_size`` samples of its own sampler
streams, so a step is one step over a **global batch of batch_size x world**
(gradients averaged; the logged loss and samples/s are over all ranks). The
validation confusion matrix is summed over the ranks' shares of the validation
set. Rank 0 alone writes the run folder (state with every rank's RNG state,
log, curves, metrics). A resume is exact for the same world size, worker
count, device kind, AMP and torch threads; another is refused with one line
naming both.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# OpenMP threads that wait for work sleep instead of spinning (libgomp reads this when torch loads it;
# where torch was imported already, or the user set it, it changes nothing). Spinning threads take
# the cores from their own busy siblings when other processes compete for the CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402  (after the wait policy)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from tilefuse import distributed
from tilefuse.outputs import (
    check_inputs, claim, clean_stale, create, current_process, filesystem_reason, found_kind, process_alive, replace_path,
    temporary_sibling, write_error, write_file,
)
from tilefuse.checkpoint import CONFIG, WEIGHTS, ModelConfig, save_checkpoint, unshared, verify_weights
from tilefuse.dataset import PatchDataset, StreamState
from tilefuse.errors import InputError
from tilefuse.metrics import ConfusionMatrix
from tilefuse.sampling import SPLIT_FILE
from tilefuse.scene import IGNORE
from tilefuse.tile_model import TileModel

STATE = "state"
LOG = "log.jsonl"
CURVES = "curves.png"
METRICS = "metrics.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_JSON = "trainer.json"
STATE_FILES = "file_sha256"
"""Key of ``trainer.json`` listing the SHA-256 of the state's other files (the weights carry their own)."""
STATE_DIGEST = "sha256"
"""Key of ``trainer.json`` holding the SHA-256 of the rest of it (:func:`_json_digest`)."""
LOG_WINDOW = "log_window"
"""Key of ``trainer.json``: the sum and count of the losses since the last log record (and their seconds), which the
next record averages; a resume goes on from them, so its log equals an uninterrupted run's. States saved before it
was recorded resume with an empty window, as they did."""
RAW = "raw_weights/"
"""Prefix of the raw (not averaged) weights in the trainer tensors of a run with ``ema_decay``."""


MAX_THREADS = 1024
"""Most torch threads a process may ask for: more than any machine's cores (torch crashes on huge counts)."""
MAX_SEED = 2**63 - 1
"""Largest seed: torch's generators take a signed 64-bit seed."""
WORKERS_PER_CORE = 4
"""Most worker processes per core (DataLoader workers, ``local:N`` dask workers): beyond that the number is a
typo (each is a process)."""


@dataclass
class TrainSettings:
    """How the loop runs (the data side is the datasets')."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: int = 0
    """Linear warm-up iterations before the cosine decay (the PAD paper uses none)."""
    min_lr: float = 0.0
    grad_clip: float = 1.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    checkpoint_every: int = 500
    val_every: int = 0
    """Validate every N steps; 0 means at every checkpoint."""
    log_every: int = 10
    workers: int = 2
    seed: int = 42
    device: str = "auto"
    amp: bool | None = None
    """bf16 autocast; None means on for CUDA, off on CPU."""
    torch_threads: int | None = None
    """torch intra-op threads of the training process; None: :func:`default_threads`."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (e.g. 0.99-0.999) for validation and checkpoints; 0 = off."""

    def check(self) -> None:
        """Refuse values the loop cannot run with (one line naming the option)."""
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            _require(name, getattr(self, name), "a whole number >= 1", lambda v: isinstance(v, int) and v >= 1)
        if self.torch_threads is not None:
            _require("torch_threads", self.torch_threads, f"a whole number in 1..{MAX_THREADS}", lambda v: isinstance(v, int) and 1 <= v <= MAX_THREADS)
        for name in ("warmup", "val_every"):
            _require(name, getattr(self, name), "a whole number >= 0", lambda v: isinstance(v, int) and v >= 0)
        _require("seed", self.seed, f"a whole number in 0..{MAX_SEED}", lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED)
        most = WORKERS_PER_CORE * default_threads()
        _require("workers", self.workers, f"a whole number in 0..{most} ({WORKERS_PER_CORE} per core)", lambda v: isinstance(v, int) and 0 <= v <= most)
        _require("lr", self.lr, "a number > 0", lambda v: math.isfinite(v) and v > 0)
        for name in ("weight_decay", "grad_clip", "min_lr"):
            _require(name, getattr(self, name), "a number >= 0", lambda v: math.isfinite(v) and v >= 0)
        _require("ema_decay", self.ema_decay, "a number in [0, 1) (0 = off)", lambda v: 0 <= v < 1)
        if self.min_lr > self.lr:
            raise InputError(f"min_lr= (--min-lr) {self.min_lr:g} is above lr= (--lr) {self.lr:g}: the cosine decays from lr down to min_lr; lower min_lr")
        check_device(self.device)


def _require(name: str, value: Any, what: str, ok: Callable[[Any], bool]) -> None:
    try:
        good = not isinstance(value, bool) and ok(value)
    except TypeError:
        good = False
    if not good:
        raise InputError(f"{name}= (--{name.replace('_', '-')}) must be {what}, got {value!r}")


DEVICE_KINDS = ("cpu", "cuda")


def check_device(name: str | None) -> str | None:
    """Refuse a device name torch or tilefuse cannot use (``auto``/None pass): one line naming the choices."""
    if name is None or name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_KINDS:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return name


def default_threads() -> int:
    """torch threads for training where none is asked: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _worker_init(owner: tuple[int, float | None], _worker_id: int) -> None:
    """DataLoader workers cut and normalise patches: one torch thread each, not one per core; and they
    end when the training process ``owner`` (pid, start time) is gone.

    A forkserver worker's parent is the forkserver, which lives as long as its
    workers do, so torch's own watchdog (parent pid changed) never fires when
    the training process is killed (SIGKILL, or a rank stopped by its job): the
    workers would be left running forever.
    """
    import threading

    torch.set_num_threads(1)

    def watch() -> None:
        while process_alive(*owner):
            time.sleep(2.0)
        os._exit(0)

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()


def cosine_factor(step: int, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """Learning-rate factor after ``step`` iterations: linear warm-up, then cosine from 1 to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for but no CUDA device is visible: pass --device cpu")
    return torch.device(name)


# ------------------------------------------------------------------ state codec


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """A JSON-ready copy of nested state with every tensor moved into ``tensors`` (by key)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {"$tensor": prefix}
    if isinstance(obj, dict):
        return {"$dict": [[k, flatten_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"$tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state without pickle")


def unflatten_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if "$tensor" in tree:
            return tensors[tree["$tensor"]]
        if "$tuple" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["$tuple"])
        return {k: unflatten_state(v, tensors) for k, v in tree["$dict"]}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------- run folder


class RunDir:
    """The files of one training run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.state = self.path / STATE
        self.log = self.path / LOG
        self.curves = self.path / CURVES
        self.metrics = self.path / METRICS

    def has_state(self) -> bool:
        return (self.state / TRAINER_JSON).is_file() and (self.state / WEIGHTS).is_file()

    def check(self, resume: bool, overwrite: bool, inputs=()) -> None:
        """Refuse an existing run unless resuming or overwriting; refuse resuming nothing.

        The run folder is a guarded output of kind ``run`` (:func:`tilefuse.outputs.claim`):
        never at, inside or around one of ``inputs`` (the training stores), and
        ``overwrite`` replaces only a run folder tilefuse made.
        """
        if resume and overwrite:
            raise InputError("resume=True (--resume) and overwrite=True (--overwrite) contradict each other: pass one")
        if resume and not self.has_state():
            if os.path.lexists(self.path):  # a run stopped before its first checkpoint: "without --resume" says "already exists"
                raise InputError(
                    f"{self.path} has no training state to resume (the run stopped before its first checkpoint): "
                    "start it again with overwrite=True (--overwrite), or choose another out= (--out)"
                )
            raise InputError(f"{self.path} has no training state to resume: start it without resume=True (--resume)")
        if os.path.lexists(self.path) and not (resume or overwrite):
            if found_kind(self.path) == "run" and not self.has_state():  # --resume would only be refused next
                raise InputError(
                    f"{self.path} already exists, a run stopped before its first checkpoint (nothing to resume): "
                    "start it again with overwrite=True (--overwrite), or choose another out= (--out)"
                )
            raise InputError(f"{self.path} already exists: pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to replace it, or choose another out= (--out)")
        if resume:  # a run folder with training state (older runs carry no marker)
            check_inputs(self.path, inputs)
        else:
            claim(self.path, "run", inputs=inputs, overwrite=overwrite)

    def start(self, resume: bool, overwrite: bool, inputs=()) -> None:
        """Create the (empty, marked) run folder, replacing an old run with ``overwrite``; clean a killed run's temporaries."""
        if not resume:
            with create(self.path, "run", inputs=inputs, overwrite=overwrite):
                pass
        for name in (STATE, WEIGHTS, CONFIG, LOG, CURVES, METRICS):
            clean_stale(self.path / name)
        top = self.path / CONFIG
        if resume and not (top.is_file() and top.read_bytes() == (self.state / CONFIG).read_bytes()):
            self._publish()  # a run killed between saving its state and copying its checkpoint: the state's is the run's

    def read_trainer(self) -> dict[str, Any]:
        """``trainer.json``, checked: it and the state files it lists match the checksums saved with them (the
        weights are checked by their own, :func:`tilefuse.checkpoint.verify_weights`). A state saved before
        checksums were recorded is read as it is."""
        damaged = f"training state in {self.state} is damaged ({{}}): start the run again with --overwrite"
        try:
            trainer = json.loads((self.state / TRAINER_JSON).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"training state in {self.state} is unreadable ({error}): start the run again with --overwrite") from None
        keys = ("step", "settings", "job", "streams", "optimizer", "scheduler", "rng")
        if not isinstance(trainer, dict) or not all(key in trainer for key in keys) or not isinstance(trainer["step"], int):
            raise InputError(damaged.format(f"{TRAINER_JSON} is not what training saves"))
        if STATE_DIGEST in trainer:
            digests = trainer.get(STATE_FILES)
            if trainer[STATE_DIGEST] != _json_digest(trainer) or not isinstance(digests, dict):
                raise InputError(damaged.format(f"{TRAINER_JSON} does not match its checksum"))
            for name, digest in digests.items():
                if _file_digest(self.state / str(name)) != digest:
                    raise InputError(damaged.format(f"{name} does not match the checksum in {TRAINER_JSON}"))
        return trainer

    def check_split(self, recorded: str | None) -> None:
        """Refuse a resume on a split file that is not the run's: one whose SHA-256 is not the one the run recorded
        (``recorded``, :func:`tilefuse.sampling.split_sha256`; its bytes, so a reformatted file is refused too).

        Checked before the file is read: an edited file that is still a split was trained on without a word
        (blocks the run had held out became training blocks, and validation, like ``evaluate --split RUN``,
        scored another split), and one edited to another block size was refused as a store that had changed. A
        deleted file is rebuilt from the stores and the seed; the caller checks that the split rebuilt is the run's.
        """
        path = self.path / SPLIT_FILE
        if path.is_file() and _file_digest(path) != recorded:
            raise InputError(
                f"{path} is not the split the run was trained with (edited since: its SHA-256 differs from the one in "
                f"{STATE}/{TRAINER_JSON}): restore it, or delete it to have it rebuilt, or start a new run with overwrite=True (--overwrite)"
            )

    def save(self, model: TileModel, config: ModelConfig, trainer: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write the state folder atomically, then refresh the top-level checkpoint files. ``trainer.json``
        records checksums of itself and of the state's other files but the weights (:meth:`read_trainer`)."""
        tmp = temporary_sibling(self.state)
        try:
            save_checkpoint(model, config, tmp)
            save_file(unshared(tensors), str(tmp / TRAINER_TENSORS))
            trainer = {**trainer, STATE_FILES: {name: _file_digest(tmp / name) for name in (TRAINER_TENSORS, CONFIG)}}
            trainer[STATE_DIGEST] = _json_digest(trainer)
            (tmp / TRAINER_JSON).write_text(json.dumps(trainer, indent=1))
            replace_path(tmp, self.state)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._publish()

    def _publish(self) -> None:
        """Copy the state's checkpoint to the run folder's top level: weights, then config.json (readers wait for both:
        :func:`tilefuse.checkpoint.read_checkpoint`)."""
        for name in (WEIGHTS, CONFIG):
            part = temporary_sibling(self.path / name)
            try:
                shutil.copyfile(self.state / name, part)
                replace_path(part, self.path / name)
            finally:  # a SIGTERM mid-copy unwinds through here: no temporary is left beside the run's files
                part.unlink(missing_ok=True)

    def load_tensors(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.state / TRAINER_TENSORS))
        except (SafetensorError, OSError) as error:
            raise InputError(f"training state in {self.state} is unreadable ({TRAINER_TENSORS}: {error}): start the run again with --overwrite") from None

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records; an unterminated last line (an append cut short by a kill) is left out."""
        if not self.log.is_file():
            return []
        text = self.log.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise InputError(f"training log {self.log} is damaged at line {number}: delete that line, or start the run again with --overwrite")
            records.append(record)
        return records

    def truncate_log(self, step: int) -> None:
        """Drop log records after ``step`` (a crashed run may have logged past its last checkpoint)."""
        kept = [r for r in self.read_log() if r.get("step", 0) <= step]
        write_file(self.log, "".join(json.dumps(r) + "\n" for r in kept))


def _full_disk(error: BaseException) -> str | None:
    """The reason (``No space left on device``) where ``error`` is a full disk or quota (:func:`tilefuse.outputs.filesystem_reason`:
    also an error whose chain or text carries one), else None."""
    codes = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))
    reason = filesystem_reason(error, codes)
    return reason if reason in {os.strerror(code) for code in codes} else None


@contextlib.contextmanager
def _writing(run: RunDir) -> Iterator[None]:
    """Writes to the run folder: a full disk or quota is one line saying that the run keeps its last checkpoint (the
    step its state holds) and that ``--resume`` finishes it once space is freed (a run with no checkpoint yet: only
    that the disk is full). The state is replaced atomically, so a write cut short leaves the previous one."""
    try:
        yield
    except Exception as error:
        reason = _full_disk(error)
        if reason is None:
            raise
        kept = None
        with contextlib.suppress(InputError, OSError, KeyError, TypeError):
            if run.has_state():
                trainer = run.read_trainer()  # checked: the step a resume would continue from
                kept = f"{run.path} keeps its last checkpoint (step {trainer['step']} of {trainer['settings']['steps']})"
        raise InputError(write_error(run.path, reason, kept=kept)) from None


def _compute_params(compute: dict[str, Any]) -> str:
    """A run's computation as parameters: ``device=cpu, amp=False, torch_threads=2``."""
    return f"device={compute.get('device')}, amp={compute.get('amp')}, torch_threads={compute.get('threads')}"


def _compute_options(compute: dict[str, Any]) -> str:
    """A run's computation as the options that give it: ``--device cpu --no-amp --torch-threads 2``."""
    threads = f" --torch-threads {compute['threads']}" if compute.get("threads") is not None else ""
    return f"--device {compute.get('device')} {'--amp' if compute.get('amp') else '--no-amp'}{threads}"


def _file_digest(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _json_digest(record: dict[str, Any]) -> str:
    """SHA-256 of ``record`` without its :data:`STATE_DIGEST` key, keys sorted (JSON floats read back exactly)."""
    rest = {key: value for key, value in record.items() if key != STATE_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------ loop


def make_loader(dataset: PatchDataset, batch_size: int, workers: int, seed: int, pin: bool = False) -> DataLoader:
    """A DataLoader whose workers start by forkserver (or spawn) and never draw from the global torch RNG."""
    context = None
    if workers > 0:
        methods = multiprocessing.get_all_start_methods()
        context = "forkserver" if "forkserver" in methods else "spawn"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        multiprocessing_context=context,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=pin,
        worker_init_fn=functools.partial(_worker_init, current_process()) if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _stop_workers(*loaders: DataLoader | None) -> None:
    """Stop the persistent worker processes of ``loaders`` now.

    They live as long as their loader, and a stopped training's traceback (which a notebook keeps
    until the next error) holds the loaders in its frames: after a KeyboardInterrupt the workers
    stayed, holding their batches and open stores. torch offers no public call for this.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def _to_device(inputs: dict[str, torch.Tensor], target: torch.Tensor, device: torch.device):
    blocking = device.type != "cuda"
    return {k: v.to(device, non_blocking=not blocking) for k, v in inputs.items()}, target.to(device, non_blocking=not blocking)


@torch.no_grad()
def validate(model: TileModel, loader: DataLoader, device: torch.device, amp: bool = False, group: distributed.Group | None = None) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over every batch of ``loader`` (label 255 ignored), summed over ``group``'s ranks.

    In a job each rank's ``loader`` holds its share of the validation set;
    ``model`` is the plain module (not DDP), so ranks may run different numbers of batches.
    """
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(model.spec.num_classes)
    try:
        for inputs, target in loader:
            inputs, target = _to_device(inputs, target, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(inputs)
            confusion.update(logits.argmax(dim=1), target)
    finally:
        model.train(was_training)
    if group is not None and group.active:
        total = group.sum(np.append(confusion.matrix.ravel(), confusion.unscored))
        confusion.matrix = total[:-1].reshape(confusion.matrix.shape)
        confusion.unscored = int(total[-1])
    return confusion


class WeightAverage:
    """An exponential moving average of a module's floating state (parameters and buffers; others are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = model
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the module's current state in after optimiser step ``step`` (1-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                self.average[key].lerp_(value.detach(), 1 - decay)
            else:
                self.average[key].copy_(value)

    @contextlib.contextmanager
    def applied(self):
        """The module holds the averaged state inside the block, its own again after."""
        raw = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.average)
        try:
            yield raw
        finally:
            self.model.load_state_dict(raw)


def fit(model: TileModel, config: ModelConfig, train_data: PatchDataset, val_data: PatchDataset | None, settings: TrainSettings, run: RunDir, **options: Any) -> dict[str, Any]:
    """Train ``model`` for ``settings.steps`` iterations into ``run`` (see :func:`_fit` for ``options``).

    torch runs with ``settings.torch_threads`` intra-op threads (default
    :func:`default_threads`, shared by the ranks on this machine in a launched
    job) for the run and gets its previous count back after. In a job launched by
    torchrun (``RANK``/``WORLD_SIZE`` set) the rank joins the process group for
    the run (NCCL on CUDA, gloo on CPU; left again also on error) and trains its
    share (module docstring).
    """
    settings.check()
    ranks = distributed.from_env()
    device = distributed.rank_device(resolve_device(settings.device), ranks)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads or distributed.rank_threads(default_threads(), ranks))
    try:
        with distributed.process_group(ranks, device) as group:
            return _fit(model, config, train_data, val_data, settings, run, group=group, **options)
    finally:
        torch.set_num_threads(threads)


def _fit(
    model: TileModel,
    config: ModelConfig,
    train_data: PatchDataset,
    val_data: PatchDataset | None,
    settings: TrainSettings,
    run: RunDir,
    *,
    job: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    val_batch_size: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    group: distributed.Group | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``settings.steps`` iterations into ``run``; returns the final metrics record.

    With ``resume`` the run continues from its saved state exactly: same
    weights, optimiser moments, learning rate, RNG and sampler position.
    ``job`` (JSON) is saved with the state so a resume can check its inputs.
    ``val_batch_size`` defaults to the training batch size. ``on_step`` gets
    the step and its loss averaged over the ranks. ``group`` is the job's
    process group (:func:`fit` joins it; None: a job of one).
    """
    from tqdm.auto import tqdm

    settings.check()
    group = group or distributed.Group(distributed.Ranks(), resolve_device(settings.device))
    ranks, device, writer = group.ranks, group.device, group.ranks.writer
    amp = settings.amp if settings.amp is not None else device.type == "cuda"
    # what decides the float results beyond the job: a resume that changes it would not continue bitwise (the
    # threads only on a CPU: a GPU run resumed on a node with other cores computes the same)
    compute = {"device": device.type, "amp": amp, "threads": torch.get_num_threads() if device.type == "cpu" else None}
    model.to(device).train()
    if ranks.rank > 0 and not resume:
        torch.manual_seed(distributed.rank_seed(settings.seed, ranks.rank))  # ranks draw their own dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    floor = settings.min_lr / settings.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, settings.steps, settings.warmup, floor)
    )
    workers = max(1, settings.workers)
    streams = StreamState.fresh(workers * ranks.world, ranks.world)
    step = 0
    average = None
    window: dict[str, Any] | None = None
    last_val: dict[str, Any] | None = None
    if writer:
        run.path.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer = run.read_trainer()
        saved = StreamState.from_dict(trainer["streams"])
        if (saved.world, saved.workers) != (ranks.world, workers):
            # the run's own --workers (0: loaded in the training process, one stream like 1 worker's), not its stream count
            given = trainer.get("job", {}).get("settings", {}).get("workers", saved.workers)
            raise InputError(
                f"the run was trained by {saved.world} process(es) x {given} worker(s), this job is {ranks.world} x {settings.workers}: "
                f"resume with {saved.world} processes (--nproc / torchrun) and --workers {given} for an exact resume"
            )
        computed = trainer.get("compute")
        if computed is not None and computed != compute:  # a run saved before this was recorded is not checked
            raise InputError(
                f"the run was trained with {_compute_params(computed)}, this job has {_compute_params(compute)}: "
                f"resume with the same ({_compute_options(computed)}) for an exact resume, or start a new run"
            )
        tensors = run.load_tensors()
        verify_weights(run.state)
        model.load_state_dict(load_file(str(run.state / WEIGHTS), device=str(device)))
        if settings.ema_decay > 0:  # the checkpoint holds the average, the trainer state the raw weights
            average = WeightAverage(model, settings.ema_decay)
            model.load_state_dict({k[len(RAW):]: v.to(device) for k, v in tensors.items() if k.startswith(RAW)})
        optimizer.load_state_dict(unflatten_state(trainer["optimizer"], tensors))
        scheduler.load_state_dict(unflatten_state(trainer["scheduler"], tensors))
        rng = unflatten_state(trainer["rng"], tensors)
        set_rng_state(rng[ranks.rank] if isinstance(rng, list) else rng)
        streams = saved
        step = int(trainer["step"])
        window = trainer.get(LOG_WINDOW)  # None: a state saved before it was recorded (the window restarts, as it did)
        if writer:
            with _writing(run):
                run.truncate_log(step)
            # the last validation up to the saved step: a resume of a finished run (no step left to run, so none
            # validates) rewrote metrics.json with "val": null
            last_val = next((r["val"] for r in reversed(run.read_log()) if "val" in r), None)
    if average is None and settings.ema_decay > 0:
        average = WeightAverage(model, settings.ema_decay)
    averaged = average.applied if average is not None else contextlib.nullcontext
    net = distributed.wrap(model, group)

    pin = device.type == "cuda"
    loader = make_loader(train_data.for_rank(ranks.rank, ranks.world).with_state(streams), settings.batch_size, settings.workers, settings.seed, pin)
    val_loader = None
    if val_data is not None:
        val_loader = make_loader(val_data.for_rank(ranks.rank, ranks.world), val_batch_size or settings.batch_size, settings.workers, settings.seed, pin)
    val_every = settings.val_every or settings.checkpoint_every
    num_classes = model.spec.num_classes
    start_step = step

    def save(at: int, metrics: dict | None) -> None:
        rng = _gather_rng(group)  # a collective: every rank, before rank 0 writes
        if not writer:
            return
        tensors: dict[str, torch.Tensor] = {}
        trainer = {
            "step": at,
            "settings": asdict(settings),
            "job": job or {},
            "streams": streams.after(at - start_step, settings.batch_size).to_dict(),
            "optimizer": flatten_state(optimizer.state_dict(), tensors, "optimizer"),
            "scheduler": flatten_state(scheduler.state_dict(), tensors, "scheduler"),
            "rng": flatten_state(rng, tensors, "rng"),
            "compute": compute,
            # the steps since the last log record: a resume logs the loss an uninterrupted run logs
            LOG_WINDOW: {"loss": window_loss, "count": window_count, "seconds": time.perf_counter() - clock},
        }
        config.extra = {**config.extra, "step": at, "steps": settings.steps, **({"val": metrics} if metrics else {})}
        with averaged() as raw:
            if average is not None:
                tensors.update({RAW + k: v for k, v in raw.items()})
            with _writing(run):
                run.save(model, config, trainer, tensors)

    window_loss, window_count, clock = 0.0, 0, time.perf_counter()
    if isinstance(window, dict) and isinstance(window.get("count"), int) and isinstance(window.get("loss"), (int, float)):
        window_loss, window_count = float(window["loss"]), window["count"]
        clock -= float(window.get("seconds") or 0.0)  # samples/s over the window's training time, not the pause
    batches = iter(loader)
    bar = tqdm(total=settings.steps, initial=step, desc="train", unit="step", disable=not (progress and writer), dynamic_ncols=True)
    try:
        while step < settings.steps:
            inputs, target = next(batches)
            inputs, target = _to_device(inputs, target, device)
            labelled = target[target != IGNORE]
            if labelled.numel() and int(labelled.max()) >= num_classes:
                raise InputError(f"the labels hold class {int(labelled.max())} but the model has {num_classes} classes: fix the labels' class_names")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = net(inputs, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over the ranks here
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if average is not None:
                average.update(step)
            value = group.mean(float(loss.detach()))
            if not math.isfinite(value):  # the weights are NaN/inf now: never checkpoint them (every rank sees the mean)
                raise InputError(
                    f"the training loss became {value} at step {step} (diverged): lower lr= (--lr, {settings.lr:g}) or clip "
                    "gradients (--grad-clip), then start again with --overwrite (earlier checkpoints of this run are kept)"
                )
            if on_step is not None:
                on_step(step, value)
            window_loss, window_count = window_loss + value, window_count + 1
            bar.update(1)
            if step % settings.log_every == 0 or step == settings.steps:
                elapsed = time.perf_counter() - clock
                record = {
                    "step": step,
                    "loss": window_loss / window_count,
                    "lr": optimizer.param_groups[0]["lr"],
                    "samples_per_s": window_count * settings.batch_size * ranks.world / max(elapsed, 1e-9),
                }
                if writer:
                    with _writing(run):
                        run.append_log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                window_loss, window_count, clock = 0.0, 0, time.perf_counter()
            if val_loader is not None and (step % val_every == 0 or step == settings.steps):
                with averaged():
                    last_val = validate(model, val_loader, device, amp, group).compute(config.class_names)
                if writer:
                    with _writing(run):
                        run.append_log({"step": step, "val": last_val})
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save(step, last_val)
    finally:
        bar.close()
        del batches
        _stop_workers(loader, val_loader)
    if average is not None:  # the caller's model ends as the checkpoint: the averaged weights
        model.load_state_dict(average.average)
    if writer:
        summary = {"complete": True, "step": step, "steps": settings.steps, "val": last_val}
        history = run.read_log()
        losses = [r["loss"] for r in history if "loss" in r]
        if losses:
            summary["final_loss"] = losses[-1]
        with _writing(run):
            write_file(run.metrics, json.dumps(summary, indent=2))
            plot_curves(history, run.curves)
    group.barrier()  # the other ranks return the summary rank 0 wrote
    return json.loads(run.metrics.read_text())


def _gather_rng(group: distributed.Group) -> dict[str, Any] | list[dict[str, Any]]:
    """This process's RNG state, or in a launched job every rank's (a list by rank, gathered on every rank)."""
    state = rng_state()
    if not group.active:
        return state
    gathered = {key: group.gather(value) if key == "torch" else [group.gather(t) for t in value] for key, value in state.items()}
    return [
        {key: (gathered[key][rank] if key == "torch" else [per[rank] for per in gathered[key]]) for key in state}
        for rank in range(group.ranks.world)
    ]


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and learning rate per step, and validation OA / mIoU, as a PNG (matplotlib Agg)."""
    import io

    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    from tilefuse.outputs import png_metadata

    train = [r for r in history if "loss" in r]
    val = [r for r in history if r.get("val")]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("loss")
        lr_axis = axes[0].twinx()
        lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="grey", alpha=0.5, label="lr")
        lr_axis.set_ylabel("learning rate")
    for key, label in (("overall_accuracy", "val OA"), ("mean_iou", "val mIoU"), ("kappa", "val kappa")):
        points = [(r["step"], r["val"][key]) for r in val if r["val"].get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=label)
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    if axes[1].lines:  # validations without a score (no labelled pixel in the split) plot nothing
        axes[1].legend(loc="lower right")
    axes[0].set_title("training")
    axes[1].set_title("validation")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format="png", metadata=png_metadata())
    write_file(path, image.getvalue())  # part of the run folder, like its log and metrics: no output of its own
