"""Tools for tests and benchmarks (need the `[dev]` extra: onnx, tritonclient)."""
