"""The Colab notebooks in colabs/ run top to bottom headlessly (tiny CPU settings) and are committed clean."""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
# The longest cells train (one or two XLA compilations) or load PyTorch; a cell past this is a hang.
CELL_TIMEOUT_S = 600


def _kernel_env(workdir: Path) -> dict[str, str]:
    """The kernel's environment: this process's, with the notebooks' CI switch and one CPU device."""
    env = dict(os.environ)
    # conftest.py forces 8 host devices for the sharding tests; a Colab CPU runtime has one, and a single device
    # compiles faster, which is what keeps these runs short.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(BTOKS_COLAB_CI="1", BTOKS_COLAB_WORKDIR=str(workdir), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("MPLBACKEND", None)  # the kernel's inline backend renders every figure, so plotting code really runs
    env.pop("BTOKS_CHECKPOINT", None)  # notebook 03 must train and export its own model here
    return env


def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_train_tpu.ipynb", "03_export_pytorch.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"
    # Notebooks travel to Colab: nothing may point into this machine's file system.
    sources = "\n".join(cell.source for cell in nb.cells)
    assert str(REPO) not in sources and str(Path.home()) + "/" not in sources


@pytest.mark.slow
@pytest.mark.xdist_group("colabs")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    """Every cell runs; a failing cell raises nbclient's CellExecutionError, which quotes its source."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(COLABS)}})  # the kernel's cwd, as in a checkout
    start = time.perf_counter()
    client.execute(env=_kernel_env(tmp_path))
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
