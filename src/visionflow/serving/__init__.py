"""Serving: the FastAPI app around the champion ONNX model, its micro-batcher, and the human review page."""
