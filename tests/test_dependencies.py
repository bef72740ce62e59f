"""Runtime requirements hold only what the runtime imports; optional extras are separate and complete."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TEST_ONLY = {"torchmetrics", "pytest", "pytest-timeout", "nbclient", "ipykernel", "jupytext"}
OPTIONAL = {"pystac", "odc-stac", "monai", "dask-cuda", "bokeh", "ipywidgets"}


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_runtime_requirements_are_trimmed_and_extras_complete():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    runtime = names(project["dependencies"])
    assert not runtime & (TEST_ONLY | OPTIONAL), runtime & (TEST_ONLY | OPTIONAL)
    assert not any("cuda" in n or n.startswith("nvidia") for n in runtime)  # the CPU install pulls no CUDA wheels
    extras = {name: names(reqs) for name, reqs in project["optional-dependencies"].items()}
    assert {"stac", "notebook", "bench", "gpu", "test"} <= set(extras)
    assert {"torchmetrics", "pystac", "nbclient", "ipykernel", "jupytext"} <= extras["test"]
    assert "pystac" in extras["stac"] and "ipykernel" in extras["notebook"]
    for name, reqs in extras.items():  # each extra installs on its own: none needs another one
        assert "tilefuse" not in reqs, name


def test_the_runtime_imports_no_test_or_optional_package():
    blocked = sorted(TEST_ONLY | OPTIONAL | {"odc", "odc.stac", "dask_cuda"})
    modules = [
        "tilefuse.cli", "tilefuse.pipelines.train", "tilefuse.pipelines.predict", "tilefuse.pipelines.evaluate",
        "tilefuse.pipelines.ingest", "tilefuse.pipelines.export", "tilefuse.pipelines.demo", "tilefuse.ecosystem",
        "tilefuse.stac", "tilefuse.training", "tilefuse.metrics", "tilefuse.cluster.client", "tilefuse.models",
    ]  # fmt: skip
    code = (
        "import sys\n"
        f"for name in {[n.replace('-', '_') for n in blocked]!r}: sys.modules[name] = None\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "from tilefuse.cli import main\n"
        "sys.exit(main(['models']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
