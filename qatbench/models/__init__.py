"""Model zoo: nanoGPT-style modules built from one dataclass config each, no I/O.

A model factory is called with the YAML ``options`` as keyword arguments and returns
``(model, example_inputs)``; the example's first dimension is the batch.
"""
