"""A module that raises when imported: the model factory of
tests/data/invalid/factory_import_raises.yaml and a broken method plugin's entry point."""

raise RuntimeError("raising_module refuses to be imported")
