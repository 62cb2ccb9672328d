"""What differs per task. `base.task` in params.yaml picks one; each stage in visionflow.stages dispatches once.

classification: the original package layout (visionflow.data, .training, .registry, .serving, .monitoring).
detection: visionflow.tasks.detection (boxes per image), reusing the shared machinery (DVC versioning, guarded
decoding, great-expectations, MLflow tracking and registry locks, the review queue, evidently).
"""
