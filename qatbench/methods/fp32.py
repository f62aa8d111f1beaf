"""The fp32 baseline: the model as trained, unchanged."""

from __future__ import annotations

from qatbench.methods.base import QuantMethod


class Fp32Method(QuantMethod):
    """Leaves the model in fp32; every other trial is compared against it."""

    name = "fp32"
