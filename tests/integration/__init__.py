"""Integration tier: the pipeline against real servers (PostgreSQL, S3-compatible store, MLflow, Prefect)."""
