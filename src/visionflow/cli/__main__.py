"""`python -m visionflow.cli ...`, as the bench scripts run it where no console script is installed."""

from visionflow.cli import entrypoint

entrypoint()
