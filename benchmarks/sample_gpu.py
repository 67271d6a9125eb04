"""Sampling speed and memory on one GPU: the pipeline at the 2B size against the PyTorch peer.

  # copy the peer once into the git-ignored .peer/ (the device tool carries it):
  #   mkdir -p .peer && cp ../shared/bench/torch_dit_peer.py .peer/
  python benchmarks/sample_gpu.py [--steps 50] [--reps 3] [--out $OUT/sample_gpu.json]
  python benchmarks/sample_gpu.py --smoke --no_peer      # a tiny run that checks the script

Workload (issue 9): text -> audio + video, 50 Euler steps with classifier-free guidance (the
prompt and the negative prompt as one doubled batch of 2), 16 frames of 512x512 (SD-VAE
latents 16x64x64x4, patch 1x2x2: 16384 video tokens) and 2 s of audio (256 mel frames x 80,
patch 1: 256 audio tokens), the `2B` config (width 2048, depth 24, 16 heads), bf16 weights and
compute, through `AudioVideoGenerationPipeline`, the code users call.

Nothing is downloaded: the DiT, the SD-VAE decoder (stabilityai/sd-vae-ft-mse's architecture)
and a BigVGAN vocoder for the config's 16 kHz / hop-125 mel (BigVGAN v2's layer widths with
upsampling 5x5x5) have random weights; speed does not depend on the values.

Reported per phase (median of --reps after one compile/warm-up call):
  dit_s       the sampling program alone (50 steps x 2 rows), latents left on the device
  vae_s       SD-VAE decode of the 16 latent frames (the codec's chunked call), to uint8 frames
  vocoder_s   the vocoder on 256 mel frames, to a float waveform on the host
  total_s     one pipeline call: tokenize, sample, decode both, return numpy
  peak_gib    the device's peak bytes in use over the run; and XLA's estimate for the
              sampling program (arguments + outputs + temporaries)
and the peer's 50-step sampling (`SAMPLE=1 python .peer/torch_dit_peer.py`: a plain DiT of the
same width, depth and token counts, SDPA, bf16, eager and torch.compile), run first, in its own
process, on the same GPU. Target (issue 9): dit_s <= 0.8 x the peer's compiled time.

Differences in what the two time, said plainly: our DiT step also runs the byte text encoder
(4 layers, 77 tokens), RoPE with QK-norm, the temporal alignment module, the 8-layer audio head
and the 6-layer 256-channel video head at full latent resolution; the peer has none of these.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The peer runs first in its own process; JAX must not then reserve 75% of the card up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, ".")
from avgen import models  # noqa: E402
from avgen.config import latent_shapes  # noqa: E402
from avgen.diffusion import objectives  # noqa: E402
from avgen.models import autoencoders  # noqa: E402
from avgen.models.autoencoders import bigvgan, sd_vae  # noqa: E402
from avgen.models.tokenizer import ByteTokenizer  # noqa: E402
from avgen.sample import pipeline as pipeline_lib  # noqa: E402
from avgen.sample.generate import Generator  # noqa: E402
from avgen.train import state as state_lib  # noqa: E402
from configs import stage2  # noqa: E402

PROMPT = "a violinist playing in a grand hall"


class _RandomCodecGenerator(Generator):
  """A Generator whose SD-VAE and vocoder are given (random) modules.

  Generator.__init__ would load the pretrained weights named in the config, which this
  offline machine cannot download; everything else is the Generator's own code.
  """

  # pylint: disable-next=super-init-not-called
  def __init__(self, config, graphdef, rest, video_codec, audio_codec):
    self.config = config
    self.graphdef, self.rest = graphdef, rest
    self.objective = objectives.build_objective(config.diffusion)
    self.tokenizer = ByteTokenizer(config.data.caption_max_len)
    self.shapes = latent_shapes(config)
    self.video_codec, self.audio_codec = video_codec, audio_codec
    self.text_encoder = None  # the byte encoder is part of the model


class _LatentMel:
  """What decoding needs of the mel analysis (its numbers and the latent's denormalization);
  the analysis itself (librosa) only runs on inputs, which this benchmark has none of."""

  def __init__(self, config):
    self.sample_rate, self.hop_length = config.data.sample_rate, config.mel.hop_length
    self.n_mels, self.mean, self.std = config.mel.n_mels, config.mel.mean, config.mel.std

  def to_log_mel(self, latent):
    return np.asarray(latent, np.float32) * np.float32(self.std) + np.float32(self.mean)


def build_config(args):
  if args.smoke:
    config = stage2.get_config("size=S")
    config.model.width, config.model.depth, config.model.num_heads = 64, 2, 2
    config.model.scan_layers = True  # as the 2B config
    config.model.audio_head_depth, config.model.video_head_depth = 1, 1
    config.model.video_head_channels, config.model.align_width = 16, 32
    config.model.text_width, config.model.text_depth, config.model.text_heads = 64, 1, 2
    config.data.num_frames, config.data.height = 4, 64
    config.data.width = 64
    config.data.audio_seconds = config.data.num_frames / config.data.fps
  else:
    config = stage2.get_config(f"size={args.size}")
  config.model.attention_impl = args.attention
  config.model.attention_window = args.window
  return config


def build_codecs(config, args):
  m, d = config.mel, config.data
  vae_channels = (32, 32, 32, 32) if args.smoke else (128, 256, 512, 512)
  vae = sd_vae.AutoencoderKL(
      sd_vae.AutoencoderKLConfig(block_out_channels=vae_channels,
                                 latent_channels=config.latent.video_channels),
      rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  rates = (5, 5, 5)  # prod = config.mel.hop_length (125)
  voc_config = bigvgan.BigVGANConfig(
      num_mels=m.n_mels, upsample_rates=rates, upsample_kernel_sizes=(11, 11, 11),
      upsample_initial_channel=64 if args.smoke else 1536, use_bias_at_final=False,
      use_tanh_at_final=False, sampling_rate=d.sample_rate, n_fft=m.n_fft, hop_size=m.hop_length,
      win_size=m.win_length, fmin=m.fmin, fmax=m.fmax)
  if voc_config.hop_length != m.hop_length:
    raise ValueError(f"vocoder hop {voc_config.hop_length} != config.mel.hop_length {m.hop_length}")
  vocoder = bigvgan.BigVGAN(voc_config, rngs=nnx.Rngs(1), dtype=jnp.bfloat16,
                            param_dtype=jnp.bfloat16)
  analysis = _LatentMel(config)
  video_codec = autoencoders.VAEVideoCodec(vae, args.vae_frames_per_chunk)
  audio_codec = autoencoders.AudioCodec(analysis, autoencoders.NeuralVocoder(
      vocoder, analysis, args.vocoder_chunk_frames))
  return video_codec, audio_codec


def build_pipeline(config, args):
  abstract = nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))
  graphdef, _, rest = state_lib.split_model(abstract)

  @jax.jit
  def init():
    model = models.build_model(config, nnx.Rngs(0))
    return state_lib.split_model(model)[1]

  params = init()
  video_codec, audio_codec = build_codecs(config, args)
  generator = _RandomCodecGenerator(config, graphdef, rest, video_codec, audio_codec)
  return pipeline_lib.AudioVideoGenerationPipeline(
      config, generator, params, dtype="bfloat16", devices=jax.local_devices()[:1])


def median_seconds(fn, reps):
  fn()  # compile / warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_peer(args, out_dir):
  env = dict(os.environ, SAMPLE="1", OUT=out_dir)
  proc = subprocess.run([sys.executable, args.peer], env=env, capture_output=True, text=True,
                        check=False)
  print(proc.stdout[-4000:], proc.stderr[-4000:], flush=True)
  path = os.path.join(out_dir, "torch_dit_peer_sample.json")
  if proc.returncode != 0 or not os.path.exists(path):
    return [dict(error=f"peer exited {proc.returncode}: {proc.stderr[-500:]}")]
  with open(path) as f:
    return json.load(f)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="2B")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--attention", default="auto", help="model.attention_impl")
  p.add_argument("--window", type=float, default=0.0,
                 help="model.attention_window (frames; 0: dense). A model trained with that "
                      "window, not the peer's computation")
  p.add_argument("--vae_frames_per_chunk", type=int, default=8)
  p.add_argument("--vocoder_chunk_frames", type=int, default=512)
  p.add_argument("--peer", default=".peer/torch_dit_peer.py")
  p.add_argument("--no_peer", action="store_true")
  p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script on a CPU)")
  p.add_argument("--out", default=None, help="JSON path (default $OUT/sample_gpu.json)")
  args = p.parse_args()
  out_dir = os.environ.get("OUT", "benchmarks/results")
  out = args.out or os.path.join(out_dir, "sample_gpu.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

  peer = [] if args.no_peer or args.smoke else run_peer(args, out_dir)

  config = build_config(args)
  pipe = build_pipeline(config, args)
  request = [pipeline_lib.Request(PROMPT, seed=0)]
  kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)

  def dit():
    video, audio, *_ = pipe.sample_latents(request, **kw)
    jax.block_until_ready((video, audio))
    return video, audio

  dit_s = median_seconds(dit, args.reps)
  video, audio = (np.asarray(x)[0] for x in dit())
  vae_s = median_seconds(lambda: pipe.generator.video_codec.decode(video), args.reps)
  vocoder_s = median_seconds(lambda: pipe.generator.audio_codec.decode(audio), args.reps)
  total_s = median_seconds(lambda: pipe(PROMPT, seed=0, **kw), args.reps)
  stats = jax.local_devices()[0].memory_stats() or {}
  estimate = pipe.memory_estimate(1, num_inference_steps=args.steps)
  ours = dict(
      device=jax.local_devices()[0].device_kind, size=args.size, smoke=args.smoke,
      steps=args.steps, video_latent=list(latent_shapes(config)["video"]),
      audio_latent=list(latent_shapes(config)["audio"]), attention=args.attention,
      attention_window=args.window,
      dit_s=dit_s, vae_s=vae_s, vocoder_s=vocoder_s, total_s=total_s,
      peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
      xla_estimate_gib=estimate["peak_estimate"] / 2**30,
      weights_gib=pipe.weight_bytes / 2**30, jax=jax.__version__)
  compiled = [r for r in peer if r.get("compiled") and "seconds" in r]
  if compiled:
    ours["peer_compiled_s"] = compiled[0]["seconds"]
    ours["dit_vs_peer"] = dit_s / compiled[0]["seconds"]
  result = dict(ours=ours, peer=peer)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))
  print(f"\n| phase | seconds |\n| --- | --- |\n| DiT ({args.steps} steps, CFG) | {dit_s:.2f} |\n"
        f"| VAE decode | {vae_s:.2f} |\n| vocoder | {vocoder_s:.2f} |\n"
        f"| total (pipeline call) | {total_s:.2f} |")
  for r in peer:
    print(f"| peer DiT, torch.compile={r.get('compiled')} | {r.get('seconds', r.get('error'))} |")


if __name__ == "__main__":
  main()
