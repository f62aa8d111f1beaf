"""The fp32 baseline: the model as trained, unchanged."""

from __future__ import annotations

from qatbench.methods.base import ALL_RUNTIMES, COMPILED, Capabilities, QuantMethod


class Fp32Method(QuantMethod):
    """Leaves the model in fp32; every other trial is compared against it."""

    name = "fp32"
    # reusable: the trials of its graph runtimes share one export of the model
    capabilities = Capabilities(
        runtimes=ALL_RUNTIMES | COMPILED, keeps_weights=True, reusable_model=True
    )
