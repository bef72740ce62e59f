"""tilefuse: streaming tiled inference and patch training for large multimodal scenes."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public API -> where it lives; imported on first use so `import tilefuse` stays light.
_API = {
    "InputError": "tilefuse.errors",
    "open_scene": "tilefuse.scene",
    "write_scene": "tilefuse.scene",
    "TileModel": "tilefuse.tile_model",
    "TileModelSpec": "tilefuse.tile_model",
    "wrap_module": "tilefuse.tile_model",
    "register_model": "tilefuse.tile_model",
    "build_model": "tilefuse.tile_model",
    "available_models": "tilefuse.tile_model",
    "save_checkpoint": "tilefuse.checkpoint",
    "load_checkpoint": "tilefuse.checkpoint",
    "ModelConfig": "tilefuse.checkpoint",
    "predict": "tilefuse.pipelines.predict",
    "export": "tilefuse.pipelines.export",
    "open_prediction": "tilefuse.prediction",
    "train": "tilefuse.pipelines.train",
    "evaluate": "tilefuse.pipelines.evaluate",
    "synth": "tilefuse.pipelines.synth",
    "ingest": "tilefuse.pipelines.ingest",
    "info": "tilefuse.pipelines.info",
    # the lazy Datasets behind synth and ingest, and pictures
    "synth_scene": "tilefuse.synthetic",
    "write_geotiffs": "tilefuse.synthetic",
    "ingest_rasters": "tilefuse.rasters",
    # scenes from the xarray ecosystem (odc-stac, stackstac, rioxarray arrays)
    "from_xarray": "tilefuse.ecosystem",
    "scene_from_xarray": "tilefuse.ecosystem",
    "quicklook_scene": "tilefuse.quicklook",
    "quicklook_labels": "tilefuse.quicklook",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'tilefuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
