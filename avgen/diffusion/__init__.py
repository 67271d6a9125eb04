"""Diffusion: objectives (flow, DDPM), training times, losses, samplers and guidance.

Pure JAX functions; the model is a black box. Time t in [0, 1]: 0 is clean, 1 is pure noise.
"""

from avgen.diffusion.guidance import guided
from avgen.diffusion.losses import (
    align_weight,
    alignment_accuracy,
    alignment_loss,
    audio_perceptual_loss,
    diffusion_loss,
    masked_mean,
    temporal_loss,
    video_perceptual_loss,
)
from avgen.diffusion.objectives import DDPM, Objective, RectifiedFlow, build_objective
from avgen.diffusion.samplers import SAMPLERS, sample
from avgen.diffusion.timesteps import sample_train_times

__all__ = [
    "DDPM",
    "Objective",
    "RectifiedFlow",
    "SAMPLERS",
    "align_weight",
    "alignment_accuracy",
    "alignment_loss",
    "audio_perceptual_loss",
    "build_objective",
    "diffusion_loss",
    "guided",
    "masked_mean",
    "sample",
    "sample_train_times",
    "temporal_loss",
    "video_perceptual_loss",
]
