"""Numba CPU and Numba-CUDA kernels (installed as devit_mq.kernels; imports nothing from devit_mq)."""
