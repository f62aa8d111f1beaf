"""Scripts that measure qatbench itself; each runs as ``python benchmarks/NAME.py``."""
