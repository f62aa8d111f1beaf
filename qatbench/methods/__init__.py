"""Quantization methods. Each module holds one method; all register via entry points."""
