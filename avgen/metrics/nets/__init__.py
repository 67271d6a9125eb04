"""Flax NNX ports of the feature extractors that evaluation metrics use: LPIPS, VGGish, CLAP, I3D.

Each port loads the PyTorch original's state dict (as that library saves it) and is checked
against the original in tests/test_eval_nets.py; I3D, which no pip package ships, against our
own PyTorch transcription of it in tests/test_eval_i3d.py. None of them is used in training.
"""
