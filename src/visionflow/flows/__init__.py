"""Prefect flows: orchestration only. Stage logic lives in the visionflow package."""
