"""deploy/: device profiles, placement planner, pipeline split, Ray runtime and export (GGUF, ONNX); imports from every layer below, nothing imports it."""
