"""Every notebook runs top to bottom in a Jupyter kernel, at its test size.

Each notebook is executed with nbclient in a fresh `python3` kernel started
in notebooks/ (as Jupyter would), with GLM_NOTEBOOK_SIZE=test (tiny models,
a few steps), the session's shared data folder (GLM_NOTEBOOK_DATA_DIR: its
corpus and tokenizers are built once per session) and a temporary folder for
the runs (GLM_NOTEBOOK_WORK_DIR). The kernel inherits this process's
environment, so the `glm` subprocesses the notebooks start share the suite's
JAX compilation cache (tests/conftest.py). A cell that raises fails the test
(nbclient's CellExecutionError names the cell and shows its traceback).
Notebooks are committed without outputs.
"""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, 'notebooks')
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, '*.ipynb')))
EXPECTED = ('quickstart', 'glm_infilling', 'ablation', 'mesh', 'quantization')


def test_there_is_a_notebook():
  assert NOTEBOOKS
  names = {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}
  assert set(EXPECTED) <= names, sorted(set(EXPECTED) - names)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  code_cells = [c for c in nb.cells if c.cell_type == 'code']
  assert code_cells
  for cell in code_cells:
    assert not cell.outputs and cell.execution_count is None, (
        'commit notebooks with outputs cleared')
  # The first code cell installs glm if needed and picks the size.
  assert 'GLM_NOTEBOOK_SIZE' in code_cells[0].source


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, data_dir, tmp_path):
  monkeypatch.setenv('GLM_NOTEBOOK_SIZE', 'test')
  monkeypatch.setenv('GLM_NOTEBOOK_DATA_DIR', data_dir)
  monkeypatch.setenv('GLM_NOTEBOOK_WORK_DIR', str(tmp_path / 'runs'))
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, kernel_name='python3', timeout=600,
                          resources={'metadata': {'path': NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError on the first failing cell
