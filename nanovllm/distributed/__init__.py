"""Tensor parallelism: the rank group a model is split over, and the worker processes of ranks 1..N-1."""
