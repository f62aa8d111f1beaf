"""One trial, from model to measurements.

``lifecycle`` drives a trial in its worker process (build, pretrain, reference, prepare,
convert, export, measure); ``measure_phase`` is its measure phase; ``in_process`` drives the
same lifecycle up to the converted model in the caller's process (the pytest fixtures);
The ONNX export itself is ``qatbench.runtimes.onnx_export`` (methods export too).
"""
