"""notebooks/sample_colab.ipynb runs top to bottom (nbclient) on a tiny checkpoint and shows a
video with sound and a spectrogram for each of the four modes; its install cell installs from
the source it is given (a git URL, a local checkout, the checkout it sits in)."""

import importlib.util
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from sample_utils import build_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sample_colab.ipynb")


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_executes_every_mode(tmp_path, monkeypatch):
  ckpt = build_checkpoint(tmp_path / "ckpt")
  out_dir = tmp_path / "samples"
  monkeypatch.setenv("AVGEN_CHECKPOINT", ckpt)
  monkeypatch.setenv("AVGEN_NOTEBOOK_STEPS", "2")
  monkeypatch.setenv("AVGEN_NOTEBOOK_OUT", str(out_dir))
  monkeypatch.delenv("AVGEN_REPO", raising=False)  # use the avgen on PYTHONPATH, install nothing
  # The kernel is its own process: one CPU device and faster compiles are enough for it.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # This checkout's avgen, whatever is installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
  videos = [h for h in html if 'src="data:video/mp4;base64,' in h]
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(videos) == 4 and len(pngs) == 4
  text = "".join(o.get("text", "") for o in outputs)
  assert f"avgen already installed: {os.path.join(ROOT, 'avgen')}" in text
  assert "the given sound is kept sample for sample: True" in text
  assert sorted(os.listdir(out_dir)) == sorted(
      ["text_to_audio_video.mp4", "text_to_audio_video.wav", "audio_to_video.mp4",
       "video_to_audio.mp4", "edit.mp4"])


def _install_cell() -> str:
  cells = nbformat.read(NOTEBOOK, as_version=4).cells
  (source,) = [c.source for c in cells if c.cell_type == "code" and "#@param" in c.source]
  return source


def _run_install_cell(monkeypatch, cwd, repo=None, importable=True):
  """Runs the install cell in this process with pip stubbed out; returns (pip calls, globals)."""
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(list(args)))
  # Without the checkout on sys.path, to see the cell add it (avgen stays imported).
  monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p) != ROOT])
  monkeypatch.chdir(cwd)
  if repo is None:
    monkeypatch.delenv("AVGEN_REPO", raising=False)
  else:
    monkeypatch.setenv("AVGEN_REPO", repo)
  if not importable:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "avgen" else real(name, *a))
  scope = {}
  exec(compile(_install_cell(), "install_cell", "exec"), scope)  # pylint: disable=exec-used
  pips = [c[c.index("install") + 1:] for c in calls if c[1:3] == ["-m", "pip"]]
  return pips, scope


def test_install_cell_installs_from_the_source_it_is_given(monkeypatch, tmp_path):
  # A git URL: pip installs it (not editable), whatever is importable already.
  pips, scope = _run_install_cell(monkeypatch, tmp_path, repo="https://example.org/x/avgen.git")
  assert pips == [["-q", "avgen @ git+https://example.org/x/avgen.git"]]
  assert scope["AVGEN_CHECKOUT"] is None
  pips, _ = _run_install_cell(monkeypatch, tmp_path, repo="git+https://example.org/a.git@dev")
  assert pips == [["-q", "avgen @ git+https://example.org/a.git@dev"]]
  # A local checkout's path: an editable install of it, and this kernel imports from it.
  pips, scope = _run_install_cell(monkeypatch, tmp_path, repo=ROOT)
  assert pips == [["-q", "-e", ROOT]] and str(scope["AVGEN_CHECKOUT"]) == ROOT
  assert sys.path[0] == ROOT


def test_install_cell_uses_the_checkout_it_runs_in(monkeypatch, tmp_path):
  notebooks = os.path.join(ROOT, "notebooks")
  pips, scope = _run_install_cell(monkeypatch, notebooks)  # avgen importable: nothing to do
  assert pips == [] and str(scope["AVGEN_CHECKOUT"]) == ROOT and sys.path[0] == ROOT
  pips, _ = _run_install_cell(monkeypatch, notebooks, importable=False)
  assert pips == [["-q", "-e", ROOT]]
  # Outside any checkout with nothing installed and no source: it stops and says what to set.
  with pytest.raises(RuntimeError, match="set AVGEN_REPO"):
    _run_install_cell(monkeypatch, tmp_path, importable=False)
