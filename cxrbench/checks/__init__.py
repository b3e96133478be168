"""Framework-free checks: ONNX models in onnxruntime, cross-backend equivalence."""
