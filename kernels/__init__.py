"""Triton kernels of fastsp, installed as `fastsp.kernels`."""
