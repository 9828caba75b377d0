"""Prefill, decode steps (CUDA-graphed on GPU), sampling and stop conditions."""
