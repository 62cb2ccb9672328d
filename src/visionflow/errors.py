"""Errors a user can act on. The CLI prints their message (no traceback) and exits with code 2."""


class VisionflowError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(VisionflowError):
    """params.yaml (or an override) is malformed or holds a value that is not allowed."""


class DataError(VisionflowError):
    """The dataset is missing, empty, unreadable or fails validation."""


class VersioningError(VisionflowError):
    """DVC could not version, push or resolve the data."""
