"""Config variants and every validation rule: each bad field fails with a message naming it."""

import pytest

from avgen import config as config_lib
from avgen.config import ConfigError
from configs import base, stage1, stage2, stage3


@pytest.mark.parametrize("size", list(base.SIZES))
@pytest.mark.parametrize("module", [stage1, stage2, stage3])
def test_every_stage_and_size_validates(module, size):
  c = module.get_config(f"size={size}")
  config_lib.validate(c, num_devices=8)
  assert c.size == size


def test_2b_is_the_original_spec_size():
  m = stage2.get_config("size=2B").model
  assert (m.width, m.depth, m.num_heads, m.audio_head_depth, m.video_head_depth) == (2048, 24, 16, 8, 6)


def test_stages_differ_only_where_the_spec_says():
  s1, s2, s3 = (m.get_config("size=B") for m in (stage1, stage2, stage3))
  assert (s1.train.learning_rate, s2.train.learning_rate, s3.train.learning_rate) == (1e-4, 5e-5, 1e-5)
  weights = lambda c: (c.loss.diffusion, c.loss.align, c.loss.perceptual, c.loss.temporal)
  assert weights(s1) == (1.0, 0.0, 0.0, 0.0)
  assert weights(s2) == (1.0, 0.1, 0.05, 0.0)
  assert weights(s3) == (1.0, 0.5, 0.1, 0.02)
  assert s2.loss.align_ramp_steps > 0 and not s1.diffusion.joint and s2.diffusion.joint
  assert s1.model == s2.model == s3.model


def test_arg_parsing():
  c = stage2.get_config("size=S,steps=7,batch=4")
  assert (c.size, c.train.num_steps, c.data.batch_size) == ("S", 7, 4)
  with pytest.raises(ValueError, match="unknown key 'stepz'"):
    stage2.get_config("stepz=3")
  with pytest.raises(ValueError, match="unknown size 'XXL'"):
    stage2.get_config("XXL")


def _demo():
  return stage2.get_config("demo")


@pytest.mark.parametrize("edit, field", [
    (lambda c: setattr(c.data, "audio_seconds", 2.0), "data.audio_seconds"),
    (lambda c: setattr(c.model, "video_patch", (1, 3, 3)), "model.video_patch"),
    (lambda c: setattr(c.model, "video_patch", (3, 4, 4)), "model.video_patch"),
    (lambda c: setattr(c.model, "audio_patch", 5), "model.audio_patch"),
    (lambda c: setattr(c.model, "num_heads", 3), "model.num_heads"),
    (lambda c: setattr(c.model, "attention_impl", "flash9"), "model.attention_impl"),
    (lambda c: setattr(c.mel, "hop_length", 300), "mel.hop_length"),
    (lambda c: setattr(c.sample, "sampler", "ddim"), "sample.sampler"),
    (lambda c: setattr(c.diffusion, "objective", "score"), "diffusion.objective"),
    (lambda c: setattr(c.model, "remat", "some"), "model.remat"),
    (lambda c: setattr(c.train, "grad_accum", 3), "train.grad_accum"),
    (lambda c: setattr(c.diffusion, "text_drop_prob", 1.5), "diffusion.text_drop_prob"),
    (lambda c: setattr(c.latent, "video_channels", 4), "latent.video"),
    (lambda c: setattr(c.model, "align_window", 3), "model.align_window"),
    (lambda c: setattr(c.data, "modalities", ("video", "smell")), "data.modalities"),
    (lambda c: setattr(c.latent, "vocoder_mel", "resample"), "latent.vocoder_mel"),
    (lambda c: setattr(c.train, "adam_mu_dtype", "float16"), "train.adam_mu_dtype"),
])
def test_each_rule_names_its_field(edit, field):
  c = _demo()
  edit(c)
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(c, num_devices=1)


def test_mesh_sizes_against_device_count():
  c = _demo()
  c.mesh.data, c.mesh.fsdp = 2, 2
  config_lib.validate(c, num_devices=4)
  with pytest.raises(ConfigError, match="multiply to 4, but there are 8 devices"):
    config_lib.validate(c, num_devices=8)
  c.mesh.data = -1
  c.mesh.fsdp = 3
  with pytest.raises(ConfigError, match="not divisible"):
    config_lib.validate(c, num_devices=8)
  c.mesh.fsdp, c.mesh.tensor = -1, -1
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    config_lib.validate(c, num_devices=8)


def test_batch_must_split_over_data_axes():
  c = _demo()
  c.data.batch_size = 12
  with pytest.raises(ConfigError, match="data.batch_size"):
    config_lib.validate(c, num_devices=8)


def test_mesh_fill():
  c = _demo()
  c.mesh.fsdp = 2
  assert config_lib.mesh_shape(c, 8) == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
