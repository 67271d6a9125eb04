"""Generate a clip from a trained workdir (or a hub id).

  python -m avgen.sample --workdir=/tmp/demo --prompt="a red circle bounces" --out=clip.mp4

Writes the .mp4 (H.264 + AAC) and a .wav beside it. Modes: text_to_audio_video (default),
audio_to_video (--audio=FILE: the given sound is kept and a video made for it), video_to_audio
(--video=FILE), edit (--audio and --video, re-generated from --strength of the schedule).
For many prompts use `python -m avgen.sample.batch`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Workdir, its checkpoints/ folder, or a hub id (for --workdir).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text prompt.")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt (default: the config's).")
_OUT = flags.DEFINE_string("out", "clip.mp4", "Output .mp4 path (a .wav is written beside it).")
_MODE = flags.DEFINE_enum("mode", "text_to_audio_video",
                          ["text_to_audio_video", "audio_to_video", "video_to_audio", "edit"],
                          "What to generate.")
_AUDIO = flags.DEFINE_string("audio", None, "Audio file for audio_to_video and edit.")
_VIDEO = flags.DEFINE_string("video", None, "Video file for video_to_audio and edit.")
_STRENGTH = flags.DEFINE_float("strength", None, "edit: share of the schedule re-run, (0, 1].")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
_SAMPLER = flags.DEFINE_string("sampler", None, "euler | heun (flow), ddim | dpm++2m (ddpm).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale for both modalities.")
_GUIDANCE_VIDEO = flags.DEFINE_float("guidance_video", None, "Video guidance (overrides --guidance).")
_GUIDANCE_AUDIO = flags.DEFINE_float("guidance_audio", None, "Audio guidance (overrides --guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weights and compute dtype (default: the checkpoint config's).")
_SCALE = flags.DEFINE_integer("scale", 0, "Integer upscale of the mp4 frames (0: to about 256 px).")


def main(argv):
  del argv
  from avgen.sample import api, media  # pylint: disable=g-import-not-at-top
  source = _CHECKPOINT.value or _WORKDIR.value
  if not source or (_CHECKPOINT.value and _WORKDIR.value):
    sys.exit("avgen.sample: give one of --workdir or --checkpoint")
  # A given file the mode would not read is refused, not dropped: it is most likely a mistyped
  # --mode, and the clip would otherwise ignore what the user meant to condition on.
  for flag, value, modes in (("--audio", _AUDIO.value, ("audio_to_video", "edit")),
                             ("--video", _VIDEO.value, ("video_to_audio", "edit"))):
    if value and _MODE.value not in modes:
      sys.exit(f"avgen.sample: {flag} is not used by --mode={_MODE.value}; it conditions "
               f"--mode={' or --mode='.join(modes)}")
  try:
    clip = api.generate_from_workdir(
        source, _PROMPT.value, mode=_MODE.value, audio_path=_AUDIO.value,
        video_path=_VIDEO.value, negative_prompt=_NEGATIVE.value, num_steps=_STEPS.value,
        sampler=_SAMPLER.value, guidance=_GUIDANCE.value, guidance_video=_GUIDANCE_VIDEO.value,
        guidance_audio=_GUIDANCE_AUDIO.value, strength=_STRENGTH.value, seed=_SEED.value,
        step=_STEP.value, dtype=_DTYPE.value)
  except (FileNotFoundError, ValueError, media.MediaError) as e:
    sys.exit(f"avgen.sample: {e}")
  scale = _SCALE.value or max(1, 256 // clip.video.shape[2])
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  clip.save(_OUT.value, scale=scale)
  wav = os.path.splitext(_OUT.value)[0] + ".wav"
  clip.save(wav)
  for note in getattr(clip, "notes", []):
    print(f"note: {note}")
  print(f"wrote {_OUT.value} and {wav}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
