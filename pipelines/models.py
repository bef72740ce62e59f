"""``tilefuse models``: the registered models, what they are, and how many parameters they have."""

from __future__ import annotations

import json
import numbers
from typing import Annotated, Any, Mapping, Optional

import typer

from tilefuse.errors import InputError, clipped, key_values


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
        modalities = _modalities(example.pop("modalities", {}), "modalities" in (overrides or {}))
        num_classes = _num_classes(example.pop("num_classes", 2))
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


_EXAMPLE_MODALITIES = """--set 'modalities={"optical": 4, "sar": 2}'"""


def _shown(value: Any) -> str:
    """A bad ``--set`` value for a message, as JSON writes it (``2.5``, ``NaN``, ``true``, ``[1]``); text is said to be
    text, and text that opens like a JSON object or list (``{bad``) to be no valid JSON."""
    if isinstance(value, str):
        return f"the text {clipped(repr(value))}" + (" (not valid JSON)" if value.lstrip()[:1] in ("{", "[") else "")
    return clipped(json.dumps(value, default=repr))


def _modalities(value: Any, given: bool) -> dict[str, int]:
    """The ``modalities`` setting, a mapping of modality name -> band count (a whole number >= 1), as a dict;
    anything else (text that is not JSON, a number, a list, a fraction or NaN as a band count) is one line naming it.
    An empty mapping is refused where the user gave it (a registered model without an example shows no count)."""
    if isinstance(value, Mapping) and not value and not given:
        return {}
    what = "--set modalities= (overrides['modalities'])"
    if not isinstance(value, Mapping) or not value:
        raise InputError(f"{what} must be a JSON object of modality name -> band count, e.g. {_EXAMPLE_MODALITIES}; got {_shown(value)}")
    for name, bands in value.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{what} names a modality {clipped(repr(name))}: give each modality a name, e.g. {_EXAMPLE_MODALITIES}")
        if isinstance(bands, bool) or not isinstance(bands, numbers.Integral) or bands < 1:
            raise InputError(
                f"{what}: the band count of {clipped(repr(name))} must be a whole number >= 1, got {_shown(bands)}: "
                f"e.g. {_EXAMPLE_MODALITIES}"
            )
    return {name: int(bands) for name, bands in value.items()}


def _num_classes(value: Any) -> int:
    """The ``num_classes`` setting, a whole number >= 1 (not a fraction, NaN, infinity or true); else one line."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(
            f"--set num_classes= (overrides['num_classes']) must be a whole number >= 1, e.g. --set num_classes=6; "
            f"got {_shown(value)}"
        )
    return int(value)


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
