"""Every notebook's code cells run top to bottom without error."""

import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))


def test_there_is_a_notebook():
  assert NOTEBOOKS


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  monkeypatch.chdir(os.path.dirname(path))
  with open(path) as f:
    nb = json.load(f)
  namespace = {'__name__': '__main__'}
  code_cells = [c for c in nb['cells'] if c['cell_type'] == 'code']
  assert code_cells
  for cell in code_cells:
    assert not cell.get('outputs'), 'commit notebooks with outputs cleared'
    exec(compile(''.join(cell['source']), path, 'exec'), namespace)  # pylint: disable=exec-used
