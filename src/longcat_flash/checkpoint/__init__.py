"""Checkpoint formats: the official HF layout (hf.py), training state (training.py), per-rank shards through
torch.distributed.checkpoint (sharded.py), and random-weight checkpoints for tests and demos (fresh.py)."""
