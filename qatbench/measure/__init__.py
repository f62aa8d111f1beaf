"""Measurements of a trial: size, latency, memory, error, environment; statistics (pure)."""
