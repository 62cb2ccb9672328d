"""visionflow: the MLOps pipeline around an image classifier."""

__version__ = "0.1.0"
