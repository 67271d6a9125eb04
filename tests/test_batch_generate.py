"""`python -m avgen.sample.batch`: one file per prompt, an index, per-line options, resuming,
failures recorded, bad prompt files refused before the model loads."""

import json
import os

import numpy as np
import pytest

from avgen.sample import api, batch, media
from sample_utils import FAST_COMPILE, shared_checkpoint, tone


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  workdir = shared_checkpoint(tmp_path_factory)
  api.load_pipeline(workdir, compiler_options=FAST_COMPILE)  # the CLIs reuse this pipeline
  return workdir


def _index(out_dir):
  with open(os.path.join(out_dir, batch.INDEX)) as f:
    return [json.loads(line) for line in f]


def _mtimes(out_dir):
  return {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir)
          if n.endswith((".mp4", ".wav"))}


def test_bad_prompt_files_are_refused_with_every_line_number(tmp_path):
  lines = [
      '{"prompt": "ok"}',
      '{"prompt": "x", "colour": "red"}',
      "not json",
      '{"seed": 3}',
      '{"prompt": "x", "mode": "image"}',
      '{"prompt": "x", "strength": 0.5}',
      '{"prompt": "x", "mode": "audio_to_video", "audio_path": "missing.wav"}',
      '{"prompt": "x", "mode": "audio_to_video"}',
      '{"prompt": "x", "seed": "7"}',
      '{"prompt": "x", "name": "a"}',
      '{"prompt": "y", "name": "a"}',
      '{"prompt": "x", "name": "../up"}',
  ]
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(batch.PromptFileError) as e:
    batch.read_prompts(str(path), {"seed": 0})
  message = str(e.value)
  for number, words in [(2, "unknown keys ['colour']"), (3, "not valid JSON"),
                        (4, 'needs a "prompt"'), (5, "mode must be"), (6, "only for mode 'edit'"),
                        (7, "no such file"), (8, "needs audio_path"), (9, "must be an integer"),
                        (11, "already used on line 10"), (12, "name '../up'")]:
    assert f"p.jsonl:{number}: " in message and words in message, (number, message)
  assert "p.jsonl:1:" not in message
  # The CLI stops before loading anything (the checkpoint does not even exist).
  assert batch.main(["--checkpoint", str(tmp_path / "none"), "--prompts", str(path),
                     "--output_dir", str(tmp_path / "out")]) == 2
  assert not (tmp_path / "out").exists()


def test_text_file_one_clip_per_prompt_index_and_resume(ckpt, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle bounces\n\na blue square\n  a green triangle  \n")
  out = str(tmp_path / "out")
  argv = ["--checkpoint", ckpt, "--prompts", str(prompts), "--output_dir", out, "--steps=2",
          "--batch_size=2", "--seed=10", "--wav", "--no_progress"]
  assert batch.main(argv) == 0
  index = _index(out)
  assert [r["options"]["prompt"] for r in index] == ["a red circle bounces", "a blue square",
                                                      "a green triangle"]
  assert [r["line"] for r in index] == [1, 3, 4] and [r["status"] for r in index] == ["done"] * 3
  assert [r["options"]["seed"] for r in index] == [10, 11, 12]
  for r in index:
    info = media.probe(os.path.join(out, r["file"]))
    assert info["num_frames"] == 4 and info["audio_codec"] == "aac"
  # Row i of a batch is the clip a single call with seed 10 + i makes.
  pipe = api.load_pipeline(ckpt)
  single = pipe("a blue square", num_inference_steps=2, seed=11)
  audio, _ = media.read_wav(os.path.join(out, index[1]["file"][:-4] + ".wav"))
  np.testing.assert_allclose(audio, single.audio, atol=2e-3)

  before = _mtimes(out)
  assert batch.main(argv) == 0  # everything is there: nothing is made again
  assert _mtimes(out) == before
  os.remove(os.path.join(out, index[2]["file"]))
  prompts.write_text("a red circle bounces\n\na blue square, at night\n  a green triangle  \n")
  assert batch.main(argv) == 0
  after, index2 = _mtimes(out), _index(out)
  assert after[index[0]["file"]] == before[index[0]["file"]]  # untouched
  assert index2[1]["file"] != index[1]["file"] and index2[1]["file"] in after  # changed prompt
  assert index2[2]["file"] == index[2]["file"] and index2[2]["file"] in after  # remade
  assert [r["status"] for r in index2] == ["done"] * 3


def test_jsonl_options_modes_and_a_failed_line(ckpt, tmp_path):
  media.write_wav(str(tmp_path / "tone.wav"), tone(0.5, 16000, 660.0), 16000)
  (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav")
  lines = [
      {"prompt": "a bell", "mode": "audio_to_video", "audio_path": "tone.wav", "name": "bell",
       "seed": 5, "guidance_scale": 1.0},
      {"prompt": "a drum", "mode": "audio_to_video", "audio_path": "broken.wav"},
      {"prompt": "a square", "guidance_video": 4.0},
  ]
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  out = str(tmp_path / "out")
  code = batch.main(["--checkpoint", ckpt, "--prompts", str(path), "--output_dir", out,
                     "--steps=2", "--batch_size=2", "--guidance=2.5", "--wav", "--no_progress"])
  assert code == 1  # one line failed
  index = _index(out)
  assert [r["status"] for r in index] == ["done", "failed", "done"]
  assert "broken.wav" in index[1]["error"] and not os.path.exists(os.path.join(out,
                                                                                index[1]["file"]))
  assert index[0]["file"] == "bell.mp4"
  assert index[0]["options"]["guidance_video"] == 1.0 == index[0]["options"]["guidance_audio"]
  assert index[2]["options"]["guidance_video"] == 4.0
  assert index[2]["options"]["guidance_audio"] == 2.5
  # audio_to_video keeps the given sound: the wav holds it sample for sample (16-bit).
  kept, _ = media.read_wav(os.path.join(out, "bell.wav"))
  np.testing.assert_allclose(kept, media.read_audio(str(tmp_path / "tone.wav"),
                                                    sample_rate=16000), atol=1.0 / 32767)
