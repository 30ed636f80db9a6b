"""Execute both Colab notebooks end to end on tiny settings (DARE_NOTEBOOK_TINY=1)."""

import os

import nbformat
import pytest
from analysis_support import tiny_runs
from conftest import REPO_ROOT
from nbclient import NotebookClient


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(REPO_ROOT)}},
        ).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs_of(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.append(str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def images_of(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def test_quickstart_notebook(tmp_path):
    notebook = execute(
        "quickstart", {"DARE_NOTEBOOK_TINY": "1", "DARE_NOTEBOOK_WORKDIR": str(tmp_path / "quick")}
    )
    text = outputs_of(notebook)
    assert "dare " in text and "twin " in text  # the comparison table
    assert images_of(notebook) == 1
    for variant in ("dare", "twin"):
        assert (tmp_path / "quick" / "runs" / variant / "results.json").exists()
    assert (tmp_path / "quick" / "analysis" / "training_curves.png").stat().st_size > 0


def test_analysis_notebook(tmp_path_factory, tmp_path):
    runs = tiny_runs(tmp_path_factory.getbasetemp() / "analysis_runs")
    notebook = execute(
        "analysis",
        {
            "DARE_NOTEBOOK_TINY": "1",
            "DARE_NOTEBOOK_OUT": str(tmp_path / "out"),
            "DARE_NOTEBOOK_RUNS": ",".join(f"{name}={path}" for name, path in runs.items()),
        },
    )
    text = outputs_of(notebook)
    assert "checkpoint step" in text and "NDCG@" in text
    assert images_of(notebook) == 3  # one heat map, the retrieval curve, one case study
    assert (tmp_path / "out" / "retrieval" / "retrieval.json").stat().st_size > 0


@pytest.mark.parametrize("name", ["quickstart", "analysis"])
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
