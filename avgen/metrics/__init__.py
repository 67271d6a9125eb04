"""Evaluation metrics: reusable math and feature extractors; the offline job lives in `eval/`.

- `frechet`: Fréchet distance between Gaussian fits (FAD, FVD) with a symmetric, stable sqrtm.
- `kernel`: KID/KVD, unbiased polynomial-kernel MMD^2 over random subsets.
- `similarity`: cosine scores (CLIP score, CLAP score) with encoders passed in as callables.
- `av_align`: AV-Align, the TempoTokens recipe.
- `sync`: event-level audio-visual sync on the synthetic bouncing-shapes task.
- `temporal`: temporal consistency (LPIPS between consecutive frames, or a labelled pixel fallback).
- `in_training`: `evaluate_samples`, the trainer's periodic evaluation.
- `weights`: where extractor weights come from; `MissingWeightsError`.
- `nets/`: Flax NNX ports of LPIPS, VGGish and CLAP, checked against their PyTorch originals.
"""
