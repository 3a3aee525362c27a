"""Checkpoint formats: the official HF layout (hf.py) and training state (training.py)."""
