"""notebooks/quickstart.ipynb runs top to bottom on a CPU, offline, in a few minutes: once training a short
digits model (no demo run found), once loading that run as it would load `make demo`'s (nothing retrained).
The shipped file carries its outputs, and its first cell prints nothing (no progress-widget warning)."""

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (make test installs it)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (make test installs it)")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (make test installs it)")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"

pytestmark = pytest.mark.slow


def execute(folder: Path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []  # the shipped outputs must not count as this run's
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert code[0].outputs == []  # imports and settings print nothing: no tqdm "IProgress not found" warning
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    images = sum("image/png" in out.get("data", {}) for out in outputs)
    return printed, images


def test_quickstart_trains_without_a_demo_run_and_loads_one_that_exists(tmp_path, monkeypatch):
    root = str(NOTEBOOK.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FASTDIT_QUICKSTART_DEMO", str(tmp_path / "no-demo-here"))
    monkeypatch.setenv("FASTDIT_QUICKSTART_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("FASTDIT_QUICKSTART_STEPS", "10")
    monkeypatch.setenv("FASTDIT_QUICKSTART_BATCH", "16")
    monkeypatch.setenv("FASTDIT_QUICKSTART_SAMPLES", "2")
    monkeypatch.setenv("FASTDIT_QUICKSTART_JUDGE_EPOCHS", "1")
    printed, images = execute(tmp_path)
    assert "training one in" in printed and "samples classified as their class" in printed
    assert "skipped: set OFFICIAL = True" in printed  # the 2.7 GB download is opt-in
    assert images == 3  # the loss curve, the demo's grid and the self-made grid, inline
    trained = tmp_path / "out" / "train" / "metrics.jsonl"
    before = trained.read_bytes()

    # Now the run exists where the notebook looks for `make demo`'s: it is loaded, not trained again.
    monkeypatch.setenv("FASTDIT_QUICKSTART_DEMO", f"{tmp_path / 'no-demo-here'}:{tmp_path / 'out'}")
    monkeypatch.setenv("FASTDIT_QUICKSTART_OUT", str(tmp_path / "not-used"))
    printed, images = execute(tmp_path)
    assert f"loaded the demo's run from {tmp_path / 'out'} (not retrained)" in printed and "training one" not in printed
    assert "samples classified as their class" in printed and images == 3
    assert trained.read_bytes() == before and not (tmp_path / "not-used").exists()


def test_the_shipped_notebook_holds_its_outputs_and_is_small():
    notebook = json.loads(NOTEBOOK.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code[0]["outputs"] == [] and all(cell["execution_count"] for cell in code)
    assert sum("image/png" in out.get("data", {}) for cell in code for out in cell["outputs"]) == 3
    assert not [out for cell in code for out in cell["outputs"] if out["output_type"] == "error"]
    assert NOTEBOOK.stat().st_size < 200_000  # small PNGs: a reviewable file, not megabytes of base64


def test_the_notebook_uses_the_public_api_only():
    """Its code reaches fastdit through `import fastdit` alone: no module below the package's API."""
    import ast

    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("fastdit"), f"the notebook imports from {node.module}"
            elif isinstance(node, ast.Import):
                assert all(alias.name == "fastdit" or not alias.name.startswith("fastdit") for alias in node.names)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "fastdit":
                import fastdit

                assert node.attr in fastdit.__all__, f"fastdit.{node.attr} is not in the public API"
