"""Shared quantization primitives: affine (de)quantization, observers, integer packing."""
