"""Shared configuration for every stage: data, model sizes, diffusion, losses, training, mesh.

Stage files (`stage1.py`, `stage2.py`, `stage3.py`) call `get_base_config(arg)` and change
only what differs between stages: modalities, loss weights, align ramp, learning rate.

`arg` is `"demo"`, a size name (`"B"`), or `key=value` pairs: `"size=XL,steps=1000"`.
"""

from __future__ import annotations

import ml_collections

# Model sizes by name. `2B` is the original spec's model: width 2048, depth 24, 16 heads, an
# 8-layer audio head and a 6-layer video head.
SIZES = {
    #        width depth heads audio_head video_head
    "demo": (128, 2, 4, 2, 1),
    "S": (384, 12, 6, 2, 2),
    "B": (768, 12, 12, 4, 3),
    "L": (1024, 24, 16, 6, 4),
    "XL": (1152, 28, 16, 8, 6),
    "2B": (2048, 24, 16, 8, 6),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"demo"` -> size=demo; `"size=B,steps=10"` -> {size: "B", steps: 10}; types follow defaults."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for part in arg.split(","):
    if "=" not in part:
      out.size = part
      continue
    key, value = part.split("=", 1)
    if key not in defaults:
      raise ValueError(f"config arg: unknown key {key!r} in {arg!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return out


def get_base_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, size="demo", steps=-1, batch=-1)
  if args.size not in SIZES:
    raise ValueError(f"config arg: unknown size {args.size!r}; known sizes: {list(SIZES)}")
  demo = args.size == "demo"
  # The settings the 2B train-step benchmark chose (benchmarks/results/train_step.md): one shared
  # AdaLN projection, scanned blocks, bfloat16 Adam first moment.
  large = args.size in ("XL", "2B")
  c = ml_collections.ConfigDict()
  c.size = args.size
  c.stage = "stage2"

  # ---- data: one clip = `num_frames` frames at `fps` and `audio_seconds` of mono audio.
  c.data = d = ml_collections.ConfigDict()
  d.path = ""  # glob of ArrayRecord shards; empty + demo -> synthetic data made in workdir/data
  d.synthetic_clips = 512 if demo else 0  # clips to synthesize when `path` is empty
  d.synthetic_max_objects = 2 if demo else 3  # shapes per synthetic clip: 1..max
  # Object half-size (fraction of min(H, W)) and speed (frame sizes per second). The demo's
  # shapes are larger, alike in size and slower (2-3 px a frame at 32x32, so consecutive frames
  # overlap): its samples then keep one object from frame to frame 4x as often
  # (benchmarks/results/demo_cpu.md, run 9).
  d.synthetic_size_range = (0.14, 0.16) if demo else (0.09, 0.16)
  d.synthetic_speed_range = (0.5, 0.8) if demo else (0.8, 1.6)
  d.num_frames = 8 if demo else 16
  d.fps = 8
  d.height = d.width = 32 if demo else 512
  d.sample_rate = 16000
  d.audio_seconds = d.num_frames / d.fps
  d.caption_max_len = 64 if demo else 77  # text tokens
  d.batch_size = 8 if demo else 16  # global batch
  d.shuffle_seed = 0
  d.num_workers = 0  # grain worker processes (0 = in-process)
  d.prefetch = 2  # batches read ahead
  d.modalities = ("video", "audio")  # stage1 may train one modality at a time

  # ---- latent spaces: how pixels and waveforms become diffusion inputs and back.
  c.latent = ml_collections.ConfigDict()
  c.latent.video = "pixels" if demo else "sd_vae"  # pixels: [T, H, W, 3] in [-1, 1]
  c.latent.video_downsample = 1 if demo else 8  # spatial factor of the video latent space
  c.latent.video_channels = 3 if demo else 4
  c.latent.audio = "mel"  # normalized log-mel [N, n_mels]
  c.latent.vocoder = "griffin_lim" if demo else "bigvgan"
  # Pretrained vocoders: "bridge" keeps the mel below as the latent and maps it into the
  # vocoder's own mel space (rate, hop, filterbank) when decoding; "native" makes the latent the
  # vocoder's own mel, which then needs the mel fields below equal to the checkpoint's.
  c.latent.vocoder_mel = "bridge"
  c.mel = m = ml_collections.ConfigDict()
  m.n_mels = 64 if demo else 80
  m.n_fft = 1024
  m.hop_length = 250 if demo else 125  # 64 (demo) / 128 mel frames per second at 16 kHz
  m.win_length = 1024
  m.fmin = 0.0
  m.fmax = 8000.0
  m.log_floor = 1e-5
  m.mean = -6.0  # log-mel normalization: (log(max(mel, floor)) - mean) / std; silence -> -1.4
  m.std = 4.0
  m.griffin_lim_iters = 32

  # ---- model: the joint audio-video DiT.
  width, depth, heads, audio_head, video_head = SIZES[args.size]
  c.model = mo = ml_collections.ConfigDict()
  mo.width = width
  mo.depth = depth
  mo.num_heads = heads
  mo.mlp_ratio = 4.0
  mo.video_patch = (2, 4, 4) if demo else (1, 2, 2)  # (frames, height, width) per token
  mo.audio_patch = 4 if demo else 1  # mel frames per token (all bins)
  mo.qk_norm = True
  mo.rope_theta = 10000.0
  # per_block: every block projects c to its own shift/scale/gate (DiT's AdaLN-Zero); single:
  # one projection per modality for all blocks plus a learned offset per block (PixArt-alpha),
  # 2 x 6 x width^2 fewer parameters per block (1.2 B of the 2B size's 3.5 B).
  mo.adaln = "single" if large else "per_block"
  mo.shared_weights = True  # False: separate attention/MLP weights per modality (MM-DiT style)
  mo.audio_head_depth = audio_head  # transformer layers
  mo.video_head_depth = video_head  # 3D-conv layers
  mo.video_head_channels = 16 if demo else 256  # full-resolution convs: the demo's main CPU cost
  mo.align_width = 64 if demo else 512  # temporal alignment features
  mo.align_window = 2 if demo else 1  # video frames per alignment window
  mo.attention_impl = "auto"  # auto | xla | cudnn | pallas
  # Joint self-attention sees only tokens within +-this many frames on the shared time axis
  # (0: everything). A block mask, so the pallas kernels skip the tiles outside it.
  mo.attention_window = 0.0
  mo.context_parallel = "ring"  # ring | all_to_all: joint self-attention when mesh.context > 1
  mo.dtype = "float32" if demo else "bfloat16"  # compute dtype
  mo.param_dtype = "float32"
  # What the DiT blocks keep for backward (avgen.config.REMAT): none | full | dots | dots_saveable
  # | nothing_saveable | everything_saveable | save_attention_out | offload_dots (to host memory)
  # | dots_attention
  mo.remat = "none" if demo else "dots_attention"
  # DiT blocks as one lax.scan (stacked params, one compiled block): unrolled, the 2B step did not
  # compile within 270 s (H100); scanned it compiles in 80-90 s.
  mo.scan_layers = large
  # byte: trained with the model, nothing downloaded. clip_text / t5_encoder: frozen pretrained
  # encoders (text_width must equal theirs: 768 for CLIP ViT-L/14, 4096 for T5-v1.1-XXL).
  mo.text_encoder = "byte"
  mo.text_encoder_source = ""  # frozen encoder weights: local dir or hub id; "" = kind's default
  mo.text_tokenizer_source = ""  # its tokenizer; "" = text_encoder_source
  mo.text_width = 128 if demo else 1024  # width of the text states the DiT attends to
  mo.text_depth = 2 if demo else 4  # layers of the byte text encoder
  mo.text_heads = 4 if demo else 8

  # ---- diffusion
  c.diffusion = df = ml_collections.ConfigDict()
  df.objective = "flow"  # flow | ddpm
  df.logit_normal_mean = 0.0
  df.logit_normal_std = 1.0
  # > 1 moves training and sampling times towards noise, where a clip's layout is decided. The
  # demo's objects split into fewer spurious blobs at 3 (benchmarks/results/demo_cpu.md).
  df.time_shift = 3.0 if demo else 1.0
  # What the network outputs for flow: "v", or "x0" (pixel space: patches hold more values than
  # the width can pass through, so predicting the clean image beats predicting v). Loss on v.
  df.flow_prediction = "x0" if demo else "v"
  df.ddpm_schedule = "cosine"  # cosine | linear
  df.ddpm_prediction = "v"  # eps | v
  df.ddpm_steps = 1000
  df.share_t_prob = 0.5  # probability that video and audio share one timestep
  df.audio_to_video_prob = 0.1  # audio given clean (t=0, loss masked): trains audio->video
  df.video_to_audio_prob = 0.1  # video given clean: trains video->audio
  df.text_drop_prob = 0.1  # caption replaced by "" (classifier-free guidance)
  df.joint = True  # False (stage 1): each example trains one modality; the other is noise

  # ---- losses: L = diffusion*Ld + align*La + perceptual*Lp + temporal*Lt
  c.loss = lo = ml_collections.ConfigDict()
  lo.diffusion = 1.0
  lo.align = 0.1
  lo.perceptual = 0.05
  lo.temporal = 0.0
  lo.align_ramp_steps = 0  # align weight rises linearly from 0 over this many steps
  lo.align_temperature = 0.1
  lo.audio_weight = 1.0  # relative weight of the audio diffusion term
  lo.video_weight = 1.0

  # ---- sampling (periodic samples in training and `avgen.sample` defaults)
  c.sample = s = ml_collections.ConfigDict()
  s.sampler = "euler"  # euler | heun (flow); ddim | dpm++2m (ddpm)
  s.num_steps = 25 if demo else 50
  s.guidance_video = 3.0 if demo else 7.5
  # The demo's audio at guidance 3 is silent in 15-28% of samples; at 1 in 7-9%, the video as
  # at 3 (benchmarks/results/demo_cpu.md, runs 16 and 19).
  s.guidance_audio = 1.0 if demo else 7.5
  s.negative_prompt = ""
  s.prompts = ("a red circle bounces", "a blue square bounces", "a green triangle and a yellow circle bounce")
  s.every = 300 if demo else 5000  # training steps between samples; 0 disables
  s.use_ema = True

  # ---- in-training evaluation of the periodic samples (avgen.metrics.in_training)
  c.eval = ev = ml_collections.ConfigDict()
  ev.every = 300 if demo else 5000  # training steps between evaluations; 0 disables
  # sync: the synthetic task's event score; av_align needs real motion; temporal: frame change
  ev.metrics = ("sync", "temporal") if demo else ("av_align", "temporal")
  ev.lpips_weights = ""  # LPIPS state dict for `temporal`; "" = the labelled pixel fallback

  # ---- training
  c.train = t = ml_collections.ConfigDict()
  t.num_steps = args.steps if args.steps > 0 else (900 if demo else 400_000)
  t.learning_rate = 5e-5
  t.warmup_steps = 50 if demo else 5000
  t.end_lr_fraction = 0.1  # cosine decays to this fraction of the peak
  t.weight_decay = 0.0 if demo else 0.01
  t.adam_b1 = 0.9
  t.adam_b2 = 0.99 if demo else 0.999
  t.adam_mu_dtype = "bfloat16" if large else "float32"  # AdamW first moment: float32 | bfloat16
  t.clip_norm = 1.0
  t.grad_accum = 1
  t.ema_decay = 0.99 if demo else 0.9999
  t.seed = 0
  t.checkpoint_every = 300 if demo else 5000
  t.keep_checkpoints = 3
  t.log_every = 20 if demo else 100
  t.max_nonfinite = 5  # consecutive non-finite steps before the run stops
  # Keep the optimizer state in pinned host memory between steps (GPU/TPU); the step brings it to
  # the device for the update only, after the backward pass (benchmarks/results/train_step.md).
  t.offload_optimizer = False
  if args.batch > 0:
    d.batch_size = args.batch

  # ---- mesh and logical sharding rules (sizes: -1 fills the remaining devices)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.context = 1
  c.mesh.tensor = 1
  # Hybrid meshes: how many slices (TPU multislice) or hosts (GPU nodes) each axis spans over the
  # slower data-center network; the axis then has (size above) x (this) devices, the sizes above
  # counting devices inside one slice. Usually only dcn_data (or dcn_fsdp) > 1.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_context = 1
  c.mesh.dcn_tensor = 1
  c.mesh.rules = (
      # activations
      ("batch", ("data", "fsdp")),
      ("length", "context"),
      ("act_embed", None),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      # parameters
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", None),
  )
  return c
