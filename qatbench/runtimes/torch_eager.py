"""``torch``: the converted module called eagerly, as the method left it."""

from __future__ import annotations

from qatbench.runtimes.base import TORCH_MODULE, EagerModule, RuntimeCapabilities


class TorchEager(EagerModule):
    """The converted torch module, eager; each timing repeat times a copy sharing its weights."""

    name = "torch"
    capabilities = RuntimeCapabilities(artifact=TORCH_MODULE)
    description = "eager PyTorch"
