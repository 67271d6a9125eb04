"""avgen: joint audio-video generation with a diffusion transformer in JAX/Flax."""

from setuptools import find_packages, setup

EXTRAS = {
    "gpu": ["jax[cuda12]>=0.6.0"],
    "tpu": ["jax[tpu]>=0.6.0"],
    # Pretrained encoders/VAE/vocoder ports: tokenizers, safetensors reading, hub downloads.
    "pretrained": ["transformers>=5.0", "safetensors>=0.4", "huggingface_hub>=0.24"],
    # Real-video ingestion at scale (Apache Beam runners) and the TFDS builder over our shards.
    "beam": ["apache-beam>=2.60"],
    # Ingestion from and to buckets: --input-dir/--output-dir gs://... or s3://... (fsspec).
    "gcs": ["gcsfs>=2023.1"],
    "s3": ["s3fs>=2023.1"],
    "tfds": ["tensorflow-datasets>=4.9", "importlib_resources>=6.0"],
    # Offline evaluation: optical flow (AV-Align), matrix square roots, plots, VGGish resampling.
    "eval": ["opencv-python-headless>=4.8", "scipy>=1.11", "soundfile>=0.12", "matplotlib>=3.8",
             "resampy>=0.4"],
}
# Tests exercise every extra, and build the PyTorch originals of ported models as references
# (torch itself is installed by .ci/run: a CPU build, not the CUDA wheel pip would pick).
EXTRAS["test"] = sorted({
    "pytest>=8.0", "pytest-xdist>=3.5", "diffusers>=0.30", "nbclient>=0.10", "ipykernel>=6.0",
    "nbformat>=5.9", "pyyaml>=6.0",
    *EXTRAS["pretrained"], *EXTRAS["beam"], *EXTRAS["tfds"], *EXTRAS["eval"]})

setup(
    name="avgen",
    version="0.1.0",
    description="Joint audio-video generation (AV-DiT) in JAX/Flax: train, sample, evaluate.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `eval/` and `configs/` stay in the checkout: a top-level `eval` module must never land in
    # site-packages, and config files are loaded by path (`--config=configs/stage2.py`).
    packages=find_packages(include=["avgen", "avgen.*", "data_pipeline", "data_pipeline.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.12.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.12",
        "array-record>=0.7.0",
        "ml-collections>=1.0.0",
        "clu>=0.0.12",
        "einops>=0.8.0",
        "librosa>=0.10.0",
        "imageio-ffmpeg>=0.5.0",
        "tensorboardX>=2.6",
        "pillow>=10.0",
        "msgpack>=1.0",
        "numpy>=1.26",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "scenedetect-headless>=0.7.2,<0.8",  # scene-cut filter of the ingestion pipeline
        "fsspec>=2023.1",  # ingestion inputs and outputs given as URLs (gs://, s3://)
        "flatbuffers>=24.0",  # jax.export serialization (exported inference)
    ],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "avgen-train=avgen.main:run",
            "avgen-sample=avgen.sample.__main__:run",
            "avgen-batch=avgen.sample.batch:run",
            "avgen-synthetic=data_pipeline.synthetic:run",
        ],
    },
)
