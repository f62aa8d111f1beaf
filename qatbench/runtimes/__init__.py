"""How a converted model is executed: torch eager or an onnxruntime session."""
