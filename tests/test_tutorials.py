"""The tutorial notebooks: stored without outputs, linked from the README, and executed.

Each notebook starts with ``smoke_test = "CI" in os.environ``; the test sets
``CI`` for the kernel, so every notebook runs its own code path with few steps
and draws (the figures quoted in the notebooks come from full runs, outside CI).
"""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# Generous: the suite may share two cores with other work; smoke runs take ~10-25 s each.
CELL_TIMEOUT = 600

nbformat = pytest.importorskip("nbformat")


def test_there_are_six_tutorials():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has stored outputs"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert 'smoke_test = "CI" in os.environ' in first_code.source, f"{path.name}: no smoke_test switch"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_linked_from_the_readme(path):
    readme = (ROOT / "README.md").read_text()
    assert f"tutorials/{path.name}" in readme, f"README.md does not link {path.name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits this process's environment.
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
