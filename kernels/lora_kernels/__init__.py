"""Triton Punica kernels and their torch reference."""
