"""Seeded datasets and the loops the runner hands to methods (calibration, training)."""
