"""Inference: paged latent cache, sampling, continuous-batching engine, MTP speculation, quantization."""
