"""Media I/O (mp4/wav through ffmpeg) and pictures (strips, spectrograms, GIFs)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from avgen.sample import media
from avgen.sample import visualize

AAC_FRAME = 1024  # samples


def _tone(freq, seconds, sample_rate, amplitude=0.5):
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _color_blocks(num_frames, height, width, seed=0):
  """Each frame one flat colour (far from the gamut edges, where encoders clip)."""
  colors = np.random.default_rng(seed).integers(30, 226, (num_frames, 3)).astype(np.uint8)
  return np.broadcast_to(colors[:, None, None, :], (num_frames, height, width, 3)).copy(), colors


def _peak_hz(audio, sample_rate):
  spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
  return np.fft.rfftfreq(len(audio), 1 / sample_rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("num_frames,fps,sample_rate,height,width,scale", [
    (8, 8, 16000, 32, 32, 8),
    (5, 3, 22050, 33, 35, 1),  # odd size, duration 5/3 s: no whole number of AAC frames
    (16, 24, 44100, 17, 9, 2),
])
def test_mp4_streams_have_the_clip_duration(tmp_path, num_frames, fps, sample_rate, height,
                                            width, scale):
  video = np.random.default_rng(0).integers(0, 256, (num_frames, height, width, 3), np.uint8)
  seconds = num_frames / fps
  path = tmp_path / "clip.mp4"
  media.write_mp4(path, video, fps, _tone(440, seconds, sample_rate), sample_rate, scale=scale)
  info = media.probe(path)
  assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
  assert info["pix_fmt"] == "yuv420p"
  assert info["num_frames"] == num_frames
  assert info["fps"] == pytest.approx(fps, rel=1e-6)
  assert info["video_duration"] == pytest.approx(seconds, abs=1e-6)
  # Odd sizes are padded up to even (yuv420p).
  assert info["height"] == height * scale + (height * scale) % 2
  assert info["width"] == width * scale + (width * scale) % 2
  assert info["sample_rate"] == sample_rate and info["audio_channels"] == 1
  assert abs(info["num_samples"] - seconds * sample_rate) <= AAC_FRAME
  assert info["audio_duration"] == pytest.approx(seconds, abs=AAC_FRAME / sample_rate)


def test_audio_longer_or_shorter_than_the_video_is_fitted(tmp_path):
  fps, sample_rate, num_frames = 8, 16000, 8
  for seconds in (0.3, 2.5):
    path = tmp_path / f"fit{seconds}.mp4"
    media.write_mp4(path, np.zeros((num_frames, 16, 16, 3), np.uint8), fps,
                    _tone(440, seconds, sample_rate), sample_rate)
    info = media.probe(path)
    assert abs(info["num_samples"] - sample_rate) <= AAC_FRAME, seconds


def test_probe_counts_decoded_frames_not_header_claims(tmp_path):
  # A file cut short keeps its header (24 frames, 2 s); probe must report what decodes.
  video = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), np.uint8)
  path = tmp_path / "full.mp4"
  media.write_mp4(path, video, 12)
  data = path.read_bytes()
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[:int(len(data) * 0.6)])
  info = media.probe(cut)
  assert info["duration"] == pytest.approx(2.0)  # the header's claim
  assert 0 < info["num_frames"] < 24
  assert info["video_duration"] == pytest.approx(info["num_frames"] / 12)


def test_read_video_window(tmp_path):
  video, colors = _color_blocks(12, 16, 16)
  path = tmp_path / "v.mp4"
  media.write_mp4(path, video, 12)
  frames, fps = media.read_video(path, start=0.25, duration=0.5)
  assert fps == 12 and len(frames) == 6
  np.testing.assert_allclose(frames.reshape(6, -1, 3).mean(1), colors[3:9], atol=4)


def test_video_colours_survive_the_round_trip(tmp_path):
  video, colors = _color_blocks(6, 32, 48)
  path = tmp_path / "colors.mp4"
  media.write_mp4(path, video, 6)
  frames, fps = media.read_video(path)
  assert fps == 6 and frames.shape == video.shape
  means = frames.reshape(len(frames), -1, 3).mean(axis=1)
  np.testing.assert_allclose(means, colors, atol=4)


def test_scale_is_nearest_neighbour(tmp_path):
  # Left half red, right half blue: after an 8x upscale the halves stay flat and separate.
  video = np.zeros((4, 8, 8, 3), np.uint8)
  video[:, :, :4] = (200, 40, 40)
  video[:, :, 4:] = (40, 40, 200)
  path = tmp_path / "scaled.mp4"
  media.write_mp4(path, video, 4, scale=8)
  frames, _ = media.read_video(path)
  assert frames.shape == (4, 64, 64, 3)
  left, right = frames[:, :, :28].astype(int), frames[:, :, 36:].astype(int)
  assert np.abs(left - (200, 40, 40)).max() <= 8
  assert np.abs(right - (40, 40, 200)).max() <= 8


def test_read_video_resamples_rate_and_size(tmp_path):
  video, colors = _color_blocks(8, 40, 60)
  path = tmp_path / "v.mp4"
  media.write_mp4(path, video, 8)
  frames, fps = media.read_video(path, fps=4, size=(20, 30))
  assert fps == 4 and frames.shape == (4, 20, 30, 3)
  # Every other source frame survives: frame i at 4 fps shows source frame 2i.
  np.testing.assert_allclose(frames.reshape(4, -1, 3).mean(1), colors[::2], atol=4)
  frames, _ = media.read_video(path, size=(16, 16), crop=True)
  assert frames.shape == (8, 16, 16, 3)


def test_audio_tone_survives_mp4_and_resampling(tmp_path):
  sample_rate, seconds = 16000, 1.0
  path = tmp_path / "tone.mp4"
  media.write_mp4(path, np.zeros((8, 16, 16, 3), np.uint8), 8, _tone(440, seconds, sample_rate),
                  sample_rate)
  audio = media.read_audio(path, sample_rate=sample_rate)
  assert audio.dtype == np.float32 and audio.ndim == 1
  assert abs(len(audio) - sample_rate * seconds) <= AAC_FRAME
  assert _peak_hz(audio, sample_rate) == pytest.approx(440, abs=2)
  assert np.sqrt(np.mean(audio**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)
  resampled = media.read_audio(path, sample_rate=8000)
  assert abs(len(resampled) - 8000 * seconds) <= AAC_FRAME
  assert _peak_hz(resampled, 8000) == pytest.approx(440, abs=2)


def test_video_only_mp4_has_no_audio_stream(tmp_path):
  path = tmp_path / "silent.mp4"
  media.write_mp4(path, np.zeros((4, 16, 16, 3), np.uint8), 4, audio=None)
  info = media.probe(path)
  assert info["has_video"] and not info["has_audio"]
  assert info["audio_codec"] is None and info["num_samples"] is None
  with pytest.raises(media.MediaError, match="no audio stream"):
    media.read_audio(path, sample_rate=16000)


def test_wav_round_trip_and_clipping(tmp_path):
  sample_rate = 22050
  audio = _tone(440, 0.5, sample_rate, amplitude=0.8)
  audio[:10] = 3.0  # out of range: clipped, not wrapped around
  path = tmp_path / "a.wav"
  media.write_wav(path, audio, sample_rate)
  back, rate = media.read_wav(path)
  assert rate == sample_rate and back.shape == audio.shape
  np.testing.assert_allclose(back, np.clip(audio, -1, 1), atol=1 / 32767)
  through_ffmpeg = media.read_audio(path, sample_rate=sample_rate)
  np.testing.assert_allclose(through_ffmpeg, back, atol=1e-4)
  info = media.probe(path)
  assert info["audio_codec"] == "pcm_s16le" and info["num_samples"] == len(audio)
  assert not info["has_video"]


def test_stereo_file_reads_as_mono_or_channels(tmp_path):
  # Make a stereo file with ffmpeg (left 440 Hz, right 1000 Hz) from two mono wavs.
  sample_rate = 16000
  left, right = tmp_path / "l.wav", tmp_path / "r.wav"
  media.write_wav(left, _tone(440, 0.5, sample_rate), sample_rate)
  media.write_wav(right, _tone(1000, 0.5, sample_rate), sample_rate)
  stereo = tmp_path / "stereo.wav"
  media._run_ffmpeg(["-i", str(left), "-i", str(right), "-filter_complex",
                     "[0:a][1:a]join=inputs=2:channel_layout=stereo", str(stereo)], what="test")
  both = media.read_audio(stereo, sample_rate=sample_rate, mono=False)
  assert both.shape == (sample_rate // 2, 2)
  assert _peak_hz(both[:, 0], sample_rate) == pytest.approx(440, abs=3)
  assert _peak_hz(both[:, 1], sample_rate) == pytest.approx(1000, abs=3)
  mono = media.read_audio(stereo, sample_rate=sample_rate)
  np.testing.assert_allclose(mono, both.mean(axis=1), atol=2e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(video=np.zeros((4, 8, 8, 3), np.float32)), "video: dtype must be uint8"),
    (dict(video=np.zeros((4, 8, 8, 2), np.uint8)), "video: last axis must be 3"),
    (dict(video=np.zeros((8, 8, 3), np.uint8)), "video: must have rank 4"),
    (dict(video=np.zeros((0, 8, 8, 3), np.uint8)), "video: T, H and W"),
    (dict(fps=0), "fps: must be a positive"),
    (dict(fps=-8), "fps: must be a positive"),
    (dict(audio=np.zeros((16000, 2), np.float32)), "audio: must be mono with rank 1"),
    (dict(audio=np.zeros(16000, np.int16)), "audio: dtype must be floating"),
    (dict(audio=np.full(16000, np.nan, np.float32)), "audio: contains NaN"),
    (dict(sample_rate=None), "sample_rate: required"),
    (dict(sample_rate=0), "sample_rate: must be a positive"),
    (dict(scale=0), "scale: must be an integer"),
])
def test_write_mp4_rejects_bad_input(tmp_path, kwargs, match):
  args = dict(video=np.zeros((4, 8, 8, 3), np.uint8), fps=4,
              audio=np.zeros(16000, np.float32), sample_rate=16000)
  args.update(kwargs)
  path = tmp_path / "bad.mp4"
  with pytest.raises(ValueError, match=match):
    media.write_mp4(path, **args)
  assert not path.exists()


def test_failed_ffmpeg_raises_with_its_log(tmp_path):
  not_media = tmp_path / "notes.mp4"
  not_media.write_text("not a video")
  with pytest.raises(media.MediaError, match="ffmpeg exited with code") as error:
    media.read_video(not_media)
  assert "Invalid data" in str(error.value) or "moov atom not found" in str(error.value)
  with pytest.raises(FileNotFoundError):
    media.probe(tmp_path / "missing.mp4")


def test_unusual_file_names(tmp_path):
  video, colors = _color_blocks(3, 16, 16)
  for name in ("clip with spaces é 音.mp4", "-starts-with-dash.mp4", "a:b.mp4"):
    path = tmp_path / name
    media.write_mp4(path, video, 3, _tone(440, 1.0, 16000), 16000)
    assert media.probe(path)["num_frames"] == 3
    frames, _ = media.read_video(path)
    np.testing.assert_allclose(frames.reshape(3, -1, 3).mean(1), colors, atol=4)
  # Only the finished files remain: no temporaries left behind.
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["clip with spaces é 音.mp4", "-starts-with-dash.mp4", "a:b.mp4"])


# ---- pictures


def test_frame_strip_layout():
  video, colors = _color_blocks(3, 4, 5)
  strip = visualize.frame_strip(video, scale=2, gap=1)
  assert strip.shape == (8, 3 * 10 + 2, 3) and strip.dtype == np.uint8
  for i in range(3):  # frames left to right in time order
    np.testing.assert_array_equal(strip[:, i * 11:i * 11 + 10], np.broadcast_to(
        colors[i], (8, 10, 3)))
  np.testing.assert_array_equal(strip[:, 10], 255)  # gap column
  with pytest.raises(ValueError, match="video: dtype must be uint8"):
    visualize.frame_strip(video.astype(np.float32))


def test_colormap_brightness_rises():
  rgb = visualize.colormap(np.linspace(0, 1, 64)).astype(float)
  luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])
  assert np.all(np.diff(luminance) > 0)


def test_spectrogram_image_orientation():
  mel = np.zeros((10, 8))
  mel[:, -1] = 1.0  # highest mel bin loud
  mel[7, :] = 0.5  # one time frame brighter
  image = visualize.spectrogram_image(mel, height_scale=3, width_scale=2)
  assert image.shape == (8 * 3, 10 * 2, 3) and image.dtype == np.uint8
  brightness = image.astype(float).sum(-1)
  assert brightness[:3].mean() > brightness[3:].mean()  # high frequency on top
  assert brightness[3:, 14:16].mean() > brightness[3:, :14].mean()  # time along x


@pytest.mark.parametrize("freq,top", [(6000, True), (150, False)])
def test_waveform_spectrogram_puts_high_tones_on_top(freq, top):
  sample_rate = 16000
  image = visualize.waveform_spectrogram(_tone(freq, 1.0, sample_rate), sample_rate, n_mels=32,
                                         height_scale=1, width_scale=1)
  assert image.shape[0] == 32 and image.shape[1] == pytest.approx(65, abs=1)
  row_brightness = image.astype(float).sum(-1).mean(1)
  loudest_row = int(np.argmax(row_brightness))
  assert (loudest_row < 8) if top else (loudest_row >= 24)


def test_stack_rows_pads_to_widest():
  a = np.full((2, 3, 3), 10, np.uint8)
  b = np.full((4, 6, 3), 20, np.uint8)
  sheet = visualize.stack_rows([a, b], gap=1)
  assert sheet.shape == (2 + 1 + 4, 6, 3)
  np.testing.assert_array_equal(sheet[:2, :3], 10)
  np.testing.assert_array_equal(sheet[:2, 3:], 255)
  np.testing.assert_array_equal(sheet[3:, :], 20)
  with pytest.raises(ValueError, match=r"images\[1\]: must have shape"):
    visualize.stack_rows([a, np.zeros((4, 6), np.uint8)])


def test_gif_bytes_decode_to_every_frame():
  video, colors = _color_blocks(5, 8, 8)
  data = visualize.gif_bytes(video, fps=10, scale=2)
  assert data[:6] == b"GIF89a"
  gif = Image.open(io.BytesIO(data))
  assert gif.n_frames == 5 and gif.size == (16, 16)
  for i in range(5):
    gif.seek(i)
    assert gif.info["duration"] == 100
    np.testing.assert_allclose(np.asarray(gif.convert("RGB"), float).mean((0, 1)), colors[i],
                               atol=8)


def test_save_png_round_trip(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), np.uint8)
  path = tmp_path / "sheet é.png"
  visualize.save_png(path, image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  with pytest.raises(ValueError, match="image: dtype must be uint8"):
    visualize.save_png(path, image.astype(np.float32))
