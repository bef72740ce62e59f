"""``tilefuse models``: the registered models, what they are, and how many parameters they have."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from tilefuse.errors import InputError, key_values


def count_parameters(name: str, modalities: dict[str, int], num_classes: int, **hparams: Any) -> int:
    """Parameters of registered model ``name`` built on the meta device (no memory, no weights)."""
    import torch

    from tilefuse.tile_model import build_model

    with torch.device("meta"):
        model = build_model(name, modalities, num_classes, **hparams)
    return sum(p.numel() for p in model.parameters())


def describe_models(name: str | None = None, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per registered model (or only ``name``): description, example config and its parameter count.

    ``overrides`` replaces example settings (``modalities``, ``num_classes`` or hyperparameters).
    """
    from tilefuse.tile_model import available_models

    models = available_models()
    if name is not None and name not in models:
        raise InputError(f"unknown model {name!r}: choose one of {', '.join(models)}")
    if overrides and name is None:
        raise InputError("--set needs a model name, e.g. `tilefuse models pad --set preset=paper`")
    records = []
    for model_name, entry in models.items():
        if name is not None and model_name != name:
            continue
        example = {**entry.defaults, **(overrides or {})}
        modalities = dict(example.pop("modalities", {}))
        num_classes = int(example.pop("num_classes", 2))
        params = count_parameters(model_name, modalities, num_classes, **example) if modalities else None
        records.append(
            {
                "name": model_name,
                "description": entry.description,
                "example": {"modalities": modalities, "num_classes": num_classes, "hparams": example},
                "parameters": params,
            }
        )
    return records


def models(
    name: Annotated[Optional[str], typer.Argument(help="Show only this model.")] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="Override an example setting, KEY=VALUE (JSON values allowed), e.g. --set preset=paper or "
            "--set 'modalities={\"hsi\": 144, \"lidar\": 1}'. Needs NAME.",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """List registered models with a description and the parameter count of an example configuration."""
    overrides = key_values(set_, "--set", "preset=paper") or {}
    records = describe_models(name, overrides)
    if json_output:
        typer.echo(json.dumps(records, indent=2))
        return
    for record in records:
        example = record["example"]
        params = "?" if record["parameters"] is None else f"{record['parameters'] / 1e6:.2f} M"
        settings = ", ".join(f"{k}={v}" for k, v in example["hparams"].items())
        bands = ", ".join(f"{k}:{v}" for k, v in example["modalities"].items())
        typer.echo(f"{record['name']:<8} {params:>10}  {record['description']}")
        typer.echo(f"{'':<8} {'':>10}  example: {bands}; {example['num_classes']} classes; {settings}")
