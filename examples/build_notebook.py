"""Regenerate examples/quickstart.ipynb, executed, from its jupytext script examples/quickstart.py.

    python examples/build_notebook.py      (needs pip install -e '.[notebook]' plus nbclient, or '.[test]')

The notebook runs in a temporary folder (its outputs are not kept), so the
committed .ipynb shows real outputs; tests/test_notebook.py executes it the
same way and checks that it matches the script.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT, NOTEBOOK = HERE / "quickstart.py", HERE / "quickstart.ipynb"


def execute(notebook, path: str | Path, timeout: int = 900):
    """Run every cell of ``notebook`` (in place) with working directory ``path``; returns it."""
    from nbclient import NotebookClient

    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path)}}).execute()
    return notebook


def main() -> int:
    import jupytext
    import nbformat

    notebook = jupytext.read(SCRIPT)
    with tempfile.TemporaryDirectory() as folder:
        execute(notebook, folder)
    for cell in notebook.cells:  # outputs only: no execution timings in the committed file
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
