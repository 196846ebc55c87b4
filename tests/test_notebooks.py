"""Every notebook under notebooks/ runs top to bottom without errors, on the CPU, in under 5 minutes, and writes the
figures it saves (``savefig("figures/NAME.png")``, in the folder it runs in: a temporary one here, so the committed
``notebooks/figures/`` that the README shows are not rewritten by the suite)."""

import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
LIMIT_S = 300


def _figures(notebook) -> list[str]:
    source = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    return re.findall(r"savefig\(\"(figures/[\w.-]+\.png)\"", source)


def test_the_three_notebooks_of_the_first_ten_minutes_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "custom_connector.ipynb", "from_internvl3.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    start = time.monotonic()
    NotebookClient(
        notebook, timeout=LIMIT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.monotonic() - start
    print(f"\n{path.name}: {elapsed:.0f} s")
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    assert elapsed < LIMIT_S, f"{path.name} took {elapsed:.0f} s"
    readme = (REPO / "README.md").read_text()
    for figure in _figures(notebook):
        written = tmp_path / figure
        assert written.exists() and written.stat().st_size > 1000, f"{path.name} did not write {figure}"
        committed = f"notebooks/{figure}"
        assert (REPO / committed).exists() and f"]({committed})" in readme, f"README must show {committed}"
