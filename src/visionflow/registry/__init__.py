"""Registry: ONNX export with a parity check, MLflow tracking, and the model registry (register, gate,
promote, roll back)."""
