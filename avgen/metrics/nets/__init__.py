"""Flax NNX ports of the feature extractors that evaluation metrics use (LPIPS, VGGish, CLAP).

Each port loads the PyTorch original's state dict (as that library saves it) and is checked
against the original in tests/test_eval_nets.py. None of them is used in training.
"""
