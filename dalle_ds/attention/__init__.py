"""Attention patterns and kernels."""
