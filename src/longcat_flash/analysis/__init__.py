"""Analytic views of a model shape: parameter bookkeeping and the theoretical decode cost model (torch-free)."""
