"""Checkpoints: safetensors weights plus a JSON config; loading never unpickles.

A checkpoint is a directory holding ``model.safetensors`` and ``config.json``.
The config names the registered model and everything needed to rebuild it and
to feed it: modalities and band counts, classes, hyperparameters, and the band
statistics its inputs were normalised with during training.

It also records the modality order (``modality_order``) and, for models whose
inputs play roles (PAD, S²Fin), the role -> modality mapping (``roles``) the
weights were built with, taken from the model itself when saving. Loading never
depends on the order of keys in the JSON: the modalities are put back in the
recorded order and the recorded roles passed to the model. A config written before
roles were recorded (no ``roles`` key) gets the rule its weights were built with:
roles by position over its modalities, which that writer stored sorted by name.

It records the band names of each modality it was trained on (``band_names``, the stores' band
coordinates), so a store with the same bands in another order is refused (:func:`band_names_conflict`
has the rule) instead of fed to weights that expect them otherwise; a config written before they were
recorded (no ``band_names`` key) has none, and its stores are not checked.

config.json records the SHA-256 of its own content (``config_sha256``, :func:`config_digest`: the parsed document
without that key, keys sorted), so a damaged or edited config is refused in one line by every reader instead of
feeding inputs normalised by a wrong band mean, or naming a class wrongly. The checksum is of the content, not of
the bytes: the same values written with other spacing, key order or number spelling (``1e-05`` as ``1E-05``)
verify. Configs written before have no such key and are read as before; deleting the key accepts an edit made on
purpose.

:meth:`ModelConfig.from_dict` checks every key's type once; a malformed config is
one :class:`~tilefuse.errors.InputError` line naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tilefuse.errors import InputError, clipped, read_json
from tilefuse.tile_model import TileModel, accepts_hyperparameter, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DIGEST = "weights_sha256"
"""config.json key: SHA-256 of the weights file's tensor bytes (after its header); safetensors has no checksum of
its own, so a flipped byte in a weight loaded silently. Checked where present (older checkpoints have none)."""
CONFIG_DIGEST = "config_sha256"
"""config.json key: SHA-256 of the rest of the config's content (:func:`config_digest`). A flipped bit in a band mean or
a class name left valid JSON that loaded silently: inputs normalised wrongly (plausible, wrong labels) or a class
misnamed in every output. Checked where present (checkpoints saved before have none and are read as before); a
config edited on purpose is accepted by deleting this key."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model and feed it correctly."""

    model: str
    modalities: dict[str, int]
    num_classes: int
    hparams: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    band_stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """modality -> {"mean": [...], "std": [...]}, one value per band."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training steps, stores, metrics, software version."""
    roles: dict[str, str] | list[str] | None = None
    """Role -> modality the weights were built with (the model's ``spec.roles``; {} for models without roles).

    None: not known yet (a fresh config; the model decides by its rule, and
    :func:`save_checkpoint` records what it decided). A list: roles by position, for
    configs written before roles were recorded.
    """
    band_names: dict[str, list[str]] = field(default_factory=dict)
    """modality -> the names of its bands, in the order the weights read them (the training stores' band
    coordinate); {} for configs written before they were recorded and where no store named its bands."""

    def build(self) -> TileModel:
        """The model of this config, with the recorded roles; InputError if the config cannot build it."""
        hparams = dict(self.hparams)
        if self.roles and accepts_hyperparameter(self.model, "roles"):
            hparams["roles"] = list(self.roles) if isinstance(self.roles, list) else dict(self.roles)
        try:
            model = build_model(self.model, self.modalities, self.num_classes, **hparams)
        except InputError:
            raise
        except (TypeError, ValueError) as error:
            raise InputError(f"hparams {self.hparams} do not build model {self.model!r} ({error}): fix them or retrain") from None
        if isinstance(self.roles, dict) and dict(model.spec.roles) != self.roles:
            raise InputError(
                f"model {self.model!r} gives its inputs the roles {dict(model.spec.roles)} but the weights were built with "
                f"{self.roles}: register a version of the model that accepts roles=, or retrain"
            )
        return model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``modality_order`` keeps the modalities' order whatever a JSON writer does with keys."""
        return {**asdict(self), "modality_order": list(self.modalities)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "checkpoint config") -> "ModelConfig":
        """A config from its JSON dict, every key's type checked; InputError naming the key otherwise."""
        return cls(**_checked_config(data, source))


def _checked_config(data: Any, source: str) -> dict[str, Any]:
    """The constructor arguments of :class:`ModelConfig` from a parsed config.json, checked (see its docstring)."""

    def bad(key: str, wanted: str) -> InputError:
        got = clipped(json.dumps(data.get(key))) if isinstance(data, dict) else ""
        return InputError(f"{source}: {key!r} must be {wanted}, got {got}: fix that key or restore the config.json `tilefuse train` wrote")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def numbers(value: Any, length: int, least: float = -math.inf) -> bool:
        """A list of ``length`` finite numbers >= ``least`` (a NaN mean made every input 0: plausible, wrong output)."""
        return isinstance(value, list) and len(value) == length and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= least for v in value
        )

    if not isinstance(data, dict):
        raise InputError(f"{source} must hold a JSON object, got {type(data).__name__}: restore the config.json `tilefuse train` wrote")
    for key in ("model", "modalities", "num_classes"):
        if key not in data:
            raise InputError(f"{source} has no {key!r}: restore the config.json `tilefuse train` wrote")
    if not isinstance(data["model"], str) or not data["model"]:
        raise bad("model", "a registered model name (a string)")
    modalities = data["modalities"]
    if not isinstance(modalities, dict) or not modalities or not all(count(v) for v in modalities.values()):
        raise bad("modalities", "an object of modality name -> band count (integers >= 1)")
    if not count(data["num_classes"]):
        raise bad("num_classes", "an integer >= 1")
    order = data.get("modality_order")
    if order is not None:
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(modalities) or len(set(order)) != len(order):
            raise bad("modality_order", f"a list of the modalities {sorted(modalities)}, each once")
        modalities = {name: modalities[name] for name in order}
    args: dict[str, Any] = {"model": data["model"], "modalities": dict(modalities), "num_classes": data["num_classes"]}
    for key in ("hparams", "extra"):
        if key in data:
            if not isinstance(data[key], dict):
                raise bad(key, "an object")
            args[key] = dict(data[key])
    if "class_names" in data:
        names = data["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) not in (0, data["num_classes"]):
            raise bad("class_names", f"a list of {data['num_classes']} strings (num_classes)")
        args["class_names"] = list(names)
    if "band_stats" in data:
        stats = data["band_stats"]
        if not isinstance(stats, dict) or not all(
            name in modalities and isinstance(value, dict)
            and numbers(value.get("mean"), modalities[name]) and numbers(value.get("std"), modalities[name], 0.0)
            for name, value in stats.items()
        ):
            raise bad("band_stats", 'an object of modality -> {"mean": [...], "std": [...]}, one finite number per band (std >= 0)')
        args["band_stats"] = {name: dict(value) for name, value in stats.items()}
    if "roles" not in data:
        args["roles"] = sorted(modalities)  # written before roles were recorded: by position, over the sorted names
    elif data["roles"] is not None:
        roles = data["roles"]
        if not isinstance(roles, dict) or not all(isinstance(v, str) and v in modalities for v in roles.values()):
            raise bad("roles", f"an object of role -> one of the modalities {sorted(modalities)}")
        args["roles"] = dict(roles)
    if "band_names" in data:
        named = data["band_names"]
        if not isinstance(named, dict) or not all(
            name in modalities and isinstance(value, list) and len(value) == modalities[name] and all(isinstance(v, str) for v in value)
            for name, value in named.items()
        ):
            raise bad("band_names", "an object of modality -> a list of its band names (strings), one per band")
        args["band_names"] = {name: list(named[name]) for name in modalities if name in named}  # the modalities' order
    return args


DEFAULT_BAND_NAME = re.compile(r"b?[0-9]+")
"""A made-up band name: ``b1``, ``b2``, ... (what ingest gives a raster band without a description and
``from_xarray`` a numeric band coordinate) or a bare number ``1``, ``2``, ... (a store written without names).
It says where a band sat in its source file, not which band it is, so it is compared with nothing."""


def known_band_names(names: list[str]) -> list[str | None]:
    """``names`` as :func:`band_names_conflict` compares them: without case and surrounding spaces, and None for
    a made-up name (:data:`DEFAULT_BAND_NAME`)."""
    return [None if DEFAULT_BAND_NAME.fullmatch(v.strip()) else v.strip().casefold() for v in names]


def band_names_conflict(names: list[str], reference: list[str], here: str = "here", there: str = "there") -> str | None:
    """How two band name lists of one modality disagree (``"'red' is band 1 here, band 3 there"``), or None.

    The rule: made-up names (:data:`DEFAULT_BAND_NAME`: ``b1``, ``2``, ...) are unknown and agree with
    anything; names are compared without case and surrounding spaces (``VV`` is ``vv``). Two lists with no
    known name in common are another naming scheme (``B02`` against ``blue``) and are not compared. Otherwise
    they must agree: each known name at the same position in both, and the same known name at each position
    where both are known. So any reordering of named bands, and another band in the place of a named one, is
    a conflict.
    """
    ours, theirs = known_band_names(names), known_band_names(reference)
    if not (set(ours) & set(theirs)) - {None}:
        return None
    for name in dict.fromkeys(n for n in ours if n is not None):
        at = [i for i, n in enumerate(ours) if n == name]
        was = [i for i, n in enumerate(theirs) if n == name]
        if was and at != was:
            return f"{names[at[0]].strip()!r} is band {at[0] + 1} {here}, band {was[0] + 1} {there}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a is not None and b is not None and a != b:
            return f"band {i + 1} is {names[i].strip()!r} {here}, {reference[i].strip()!r} {there}"
    return None


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each one whose memory an earlier one already holds: safetensors refuses to
    save shared memory, so a model with tied weights (one layer used twice) trained to its end and then failed
    to checkpoint. Loading fills both names of a tied weight with the same values."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out


def save_checkpoint(model: TileModel, config: ModelConfig, path: str | os.PathLike, *, inputs=()) -> Path:
    """Write ``model``'s weights and ``config`` to directory ``path``, atomically (temp dir + rename).

    Through the guarded writer (:mod:`tilefuse.outputs`): an existing
    checkpoint written by tilefuse is replaced; anything else at ``path``, or a
    ``path`` at, inside or around one of ``inputs``, is refused.
    """
    from tilefuse.outputs import create, local_path

    path = local_path(path, "checkpoint", output=True)  # ~ is the home folder, as for every other path
    state = unshared({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    size = sum(v.numel() * v.element_size() for v in state.values())
    with create(path, "checkpoint", inputs=inputs, overwrite=True, size=size, what="checkpoint") as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"model": config.model})
        data = replace(config, roles=dict(model.spec.roles)).to_dict()  # the roles the weights have
        with open(tmp / WEIGHTS, "rb") as weights:
            digest = _weights_digest(weights)
        record = json.loads(json.dumps({**data, DIGEST: digest}))  # as a reader parses it: tuples are lists, keys strings
        record[CONFIG_DIGEST] = config_digest(record)
        (tmp / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def config_digest(data: dict[str, Any]) -> str:
    """SHA-256 of a parsed config.json without its :data:`CONFIG_DIGEST` key, keys sorted (Python's JSON writes every
    float so that it reads back exactly, so a config just saved always verifies)."""
    rest = {key: value for key, value in data.items() if key != CONFIG_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _config_intact(data: Any) -> bool:
    """Whether a parsed config.json matches the checksum it records (one without any: an older config, not checked)."""
    if not isinstance(data, dict) or CONFIG_DIGEST not in data:
        return True
    try:
        return data[CONFIG_DIGEST] == config_digest(data)
    except (TypeError, ValueError, RecursionError):  # no way to write it back: not what save_checkpoint wrote
        return False


def _config_damaged(config_file: Path) -> InputError:
    return InputError(
        f"checkpoint config {config_file} does not match the checksum it records (damaged or edited): retrain or restore it "
        f"(to keep an edit made on purpose, delete its {CONFIG_DIGEST!r} key)"
    )


def _weights_digest(handle, whole=None) -> str:
    """SHA-256 of the tensor bytes of an open safetensors file (everything after its 8-byte length and JSON header).

    ``whole``, a hashlib object, is fed every byte of the file on the same pass (:func:`checkpoint_hash`).
    """
    digest = hashlib.sha256()
    start, position = None, 0
    handle.seek(0)
    for block in iter(lambda: handle.read(1 << 20), b""):
        if start is None:
            start = 8 + int.from_bytes(block[:8], "little")
        if whole is not None:
            whole.update(block)
        if position + len(block) > start:
            digest.update(block[max(0, start - position) :])
        position += len(block)
    return digest.hexdigest()


READ_TRIES = 40
"""Reads of a checkpoint that changes under them before giving up (about 20 s): a training run replaces its run
folder's weights and config.json one after the other, and its ``state/`` folder by moving the old one aside."""


MISSING_TRIES = 5
"""Reads (under a second) that wait for a missing checkpoint file to appear while a live process writes the run:
its state folder is gone only for the instant of its replacement; a run before its first save has none."""


def _writer(path: Path) -> str | None:
    """The live process writing checkpoint ``path`` (a run folder, or the ``state/`` folder inside one), if any."""
    from tilefuse.outputs import live_writer

    return live_writer(path) or live_writer(path.parent)


def _read(
    path: Path, device: str | torch.device | None = None, *, wait: bool = True
) -> tuple[Any, str, dict[str, torch.Tensor] | None]:
    """The parsed config.json, :func:`checkpoint_hash` and (with ``device``) the weights of one version of checkpoint ``path``.

    The config is checked against the checksum of its own content it records (:data:`CONFIG_DIGEST`), then the
    weights against the checksum the config records. A read that saw either file change (another process
    replacing the checkpoint), or found a mismatch while a live process writes the run (between its two
    replacements), is read again; a checkpoint nobody writes that does not match is damaged.
    ``wait=False``: the caller writes the run itself (a resume), so nothing else changes it.
    """
    weights, config_file = path / WEIGHTS, path / CONFIG
    for attempt in range(READ_TRIES):
        writer = _writer(path) if wait else None
        try:
            raw = config_file.read_bytes()
            with open(weights, "rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                state = load_file(str(weights), device=str(device)) if device is not None else None
                whole = hashlib.sha256()
                found = _weights_digest(handle, whole)
            same = os.stat(weights).st_ino == inode and config_file.read_bytes() == raw
        except (SafetensorError, OSError, ValueError) as error:
            if writer is None or (attempt >= MISSING_TRIES and not (config_file.is_file() and weights.is_file())):
                read_config(path)  # a missing checkpoint (a run before its first save), a file given for its folder: one line
                raise InputError(f"checkpoint weights {weights} are unreadable ({error}): retrain or restore them") from None
            same = False  # e.g. the state folder, moved aside while its successor moves in
        if same:
            try:
                data = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise InputError(f"checkpoint config {config_file} is unreadable (it is not JSON: {error}): retrain or restore it") from None
            intact = _config_intact(data)
            if not intact and writer is None:
                raise _config_damaged(config_file)
            recorded = data.get(DIGEST) if isinstance(data, dict) else None
            if intact and (recorded is None or found == recorded):
                whole.update(raw)
                return data, whole.hexdigest(), state
            if writer is None:
                raise InputError(
                    f"checkpoint weights {weights} do not match the checksum in its {CONFIG} (damaged, or not the weights "
                    "saved with that config): retrain or restore them (a killed training run: resume it)"
                )
        time.sleep(min(0.05 * (attempt + 1), 1.0))
    raise InputError(
        f"checkpoint {path} kept changing while it was read ({_writer(path) or 'another process'} is writing it): "
        "wait for that training to finish, or use a copy of the checkpoint"
    )


def verify_weights(path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose weights do not match the checksum its config records (InputError, one line).

    For the writer of the run that holds it (a training resume): a mismatch is damage, at once."""
    _read(_local(path), wait=False)


def _local(path: str | os.PathLike) -> Path:
    from tilefuse.outputs import local_path

    return local_path(path, "checkpoint")  # ~ is the home folder


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Read a checkpoint's config without loading weights (checked against the checksum it records, not the weights)."""
    path = _local(path)
    config_file = path / CONFIG
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist: pass a directory written by `tilefuse train`")
    if not config_file.is_file() or not (path / WEIGHTS).is_file():
        inside = path.is_file() and (path.parent / CONFIG).is_file() and (path.parent / WEIGHTS).is_file()
        fix = f"pass the folder holding them, {path.parent}" if inside else "written by `tilefuse train`"
        raise InputError(f"{path} is not a checkpoint: it needs {CONFIG} and {WEIGHTS} ({fix})")
    data = read_json(config_file, "checkpoint config", "retrain or restore it")
    if not _config_intact(data):
        raise _config_damaged(config_file)
    return ModelConfig.from_dict(data, source=f"checkpoint config {config_file}")


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """The config and :func:`checkpoint_hash` of one version of checkpoint ``path`` (read whole even while a
    training run replaces it), its weights checked against their recorded checksum; weights are not loaded."""
    path = _local(path)
    data, digest, _ = _read(path)
    return ModelConfig.from_dict(data, source=f"checkpoint config {path / CONFIG}"), digest


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, expect_hash: str | None = None
) -> tuple[TileModel, ModelConfig]:
    """Rebuild the model of checkpoint ``path`` with its weights, in eval mode, on ``device``.

    Config and weights come from one version of the checkpoint (see :func:`read_checkpoint`).
    ``expect_hash``: refuse (InputError) a checkpoint whose :func:`checkpoint_hash` is another, e.g. one
    rewritten by a training run since a prediction recorded its hash.
    """
    path = _local(path)
    data, digest, state = _read(path, device)
    if expect_hash is not None and digest != expect_hash:
        raise InputError(
            f"checkpoint {path} changed after this prediction started (a training run rewrote it?): "
            "predict again once it no longer changes, or from a copy of it"
        )
    config = ModelConfig.from_dict(data, source=f"checkpoint config {path / CONFIG}")
    model = config.build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"weights in {path} do not fit model {config.model!r} ({first})") from None
    return model.to(device).eval(), config


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights and config: identifies what produced a prediction.

    The same pass over the weights checks them against their recorded checksum (:func:`verify_weights`),
    so a damaged checkpoint is refused before a prediction starts.
    """
    return read_checkpoint(path)[1]
