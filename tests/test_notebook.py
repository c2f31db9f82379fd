"""notebooks/quickstart.ipynb runs top to bottom on a CPU, offline, in a few minutes (a short training
and a small sample; the released model's section skips itself, as it does without internet)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install 'fastdit[app]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install 'fastdit[app]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install 'fastdit[app]')")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"

pytestmark = pytest.mark.slow


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    root = str(NOTEBOOK.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FASTDIT_QUICKSTART_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("FASTDIT_QUICKSTART_OFFICIAL", "no")
    monkeypatch.setenv("FASTDIT_QUICKSTART_STEPS", "10")
    monkeypatch.setenv("FASTDIT_QUICKSTART_BATCH", "16")
    monkeypatch.setenv("FASTDIT_QUICKSTART_SAMPLES", "2")
    monkeypatch.setenv("FASTDIT_QUICKSTART_JUDGE_EPOCHS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "skipped: FASTDIT_QUICKSTART_OFFICIAL=no" in printed and "samples classified as their class" in printed
    # the loss curve, the demo's grid and the self-made grid are shown inline
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 3
    assert (tmp_path / "out" / "report.json").is_file()
