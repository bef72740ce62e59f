"""examples/quickstart.ipynb: in step with its jupytext script, and runs top to bottom on a CPU."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "quickstart.ipynb"
SCRIPT = EXAMPLES / "quickstart.py"


def cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_notebook_is_generated_from_the_script():
    generated = jupytext.read(SCRIPT)
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert cells(committed) == cells(generated), "regenerate it: python examples/build_notebook.py"


def test_notebook_uses_the_public_api_only():
    import tilefuse

    source = SCRIPT.read_text()
    used = set(re.findall(r"\btilefuse\.([A-Za-z_]\w*)", source))
    assert used <= set(tilefuse._API), used - set(tilefuse._API)
    assert "from tilefuse" not in source and "tilefuse._" not in source


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_notebook_executes(tmp_path):
    pytest.importorskip("nbclient")
    sys.path.insert(0, str(EXAMPLES))
    try:
        from build_notebook import execute
    finally:
        sys.path.remove(str(EXAMPLES))

    notebook = execute(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    out = tmp_path / "quickstart-output"
    for name in ("train.zarr", "test.zarr", "prediction.zarr", "prediction.tif", "run/curves.png", "prediction.png"):
        assert (out / name).exists(), name
    text = "".join(
        output.get("text", "") + "".join(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
    assert "OA " in text and "mIoU" in text
    assert "dask dashboard" in text  # the link, or how to get one
    images = sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))
    assert images >= 3  # the scene's quicklook, the training curves, the prediction next to the truth
