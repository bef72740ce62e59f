"""Checkpoints: safetensors weights plus a JSON config; loading never unpickles.

A checkpoint is a directory holding ``model.safetensors`` and ``config.json``.
The config names the registered model and everything needed to rebuild it and
to feed it: modalities and band counts, classes, hyperparameters, and the band
statistics its inputs were normalised with during training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tilefuse.atomic import replace_path, temporary_sibling
from tilefuse.errors import InputError
from tilefuse.tile_model import TileModel, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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

    def build(self) -> TileModel:
        return build_model(self.model, self.modalities, self.num_classes, **self.hparams)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def save_checkpoint(model: TileModel, config: ModelConfig, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights and ``config`` to directory ``path``, atomically (temp dir + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"model": config.model})
        (tmp / CONFIG).write_text(config.to_json())
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Read a checkpoint's config without loading weights."""
    path = Path(path)
    config_file = path / CONFIG
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist: pass a directory written by `tilefuse train`")
    if not config_file.is_file() or not (path / WEIGHTS).is_file():
        raise InputError(f"{path} is not a checkpoint: it needs {CONFIG} and {WEIGHTS} (written by `tilefuse train`)")
    try:
        return ModelConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
        raise InputError(f"checkpoint config {config_file} is unreadable ({error}): retrain or restore it") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[TileModel, ModelConfig]:
    """Rebuild the model of checkpoint ``path`` with its weights, in eval mode, on ``device``."""
    path = Path(path)
    config = read_config(path)
    model = config.build()
    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"checkpoint weights {path / WEIGHTS} are unreadable ({error}): retrain or restore them") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"weights in {path} do not fit model {config.model!r} ({first})") from None
    return model.to(device).eval(), config


def checkpoint_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights and config: identifies what produced a prediction."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, CONFIG):
        with open(Path(path) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
