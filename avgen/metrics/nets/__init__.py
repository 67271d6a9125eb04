"""Flax NNX ports of the feature extractors that evaluation metrics use: LPIPS, VGGish, CLAP, I3D.

Each port loads the PyTorch original's state dict (as that library saves it) and is checked
against the original in tests/test_eval_nets.py; I3D against the original InceptionI3d code as
cd-fvd 0.1.1 ships it, in tests/test_eval_i3d.py. None of them is used in training.
"""
