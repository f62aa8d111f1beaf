"""A user's own encoder, data and metric for qatbench (see experiments/byo_model.yaml)."""
