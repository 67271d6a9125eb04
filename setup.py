"""avgen: joint audio-video generation with a diffusion transformer in JAX/Flax."""

from setuptools import find_packages, setup

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
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5"],
        "gpu": ["jax[cuda12]>=0.6.0"],
        "tpu": ["jax[tpu]>=0.6.0"],
        # Pretrained encoders/VAE/vocoder ports (issue 5) and the TFDS builder (issue 4).
        "pretrained": ["transformers>=4.50", "safetensors>=0.4", "huggingface_hub>=0.24"],
        "tfds": ["tensorflow-datasets>=4.9"],
    },
    entry_points={
        "console_scripts": [
            "avgen-train=avgen.main:run",
            "avgen-sample=avgen.sample.__main__:run",
            "avgen-synthetic=data_pipeline.synthetic:run",
        ],
    },
)
