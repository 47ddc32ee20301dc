"""The analysis notebook stays clean in git and runs top to bottom on a small MLflow store."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from report_data import build_store

from knormpress.report.figures import task_figures

FIGURES = task_figures()
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "analysis.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", build_store(tmp_path))
    monkeypatch.setenv("KNORMPRESS_RESULTS_DIR", str(tmp_path / "figures"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == sorted(FIGURES)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == len(FIGURES)
    assert any("does not hold" in str(o.get("data", {})) for o in outputs)  # the claims table
