"""Triton kernels of one NCA step (forward and backward) and their launchers.

Installed as ``nca_fast.kernels``; imports only torch and triton, never ``nca_fast``.
"""
