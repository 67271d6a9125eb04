"""notebooks/sample_colab.ipynb runs top to bottom (nbclient) on a tiny checkpoint and shows a
video with sound and a spectrogram for each of the four modes."""

import os

import nbformat
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
  assert "the given sound is kept sample for sample: True" in text
  assert sorted(os.listdir(out_dir)) == sorted(
      ["text_to_audio_video.mp4", "text_to_audio_video.wav", "audio_to_video.mp4",
       "video_to_audio.mp4", "edit.mp4"])
