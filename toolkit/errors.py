"""User-facing errors: the CLI prints their message on one line and exits with code 1."""

from __future__ import annotations


class ToolkitError(Exception):
    """An error the user can fix; the message names the field or input and the fix."""


class ConfigError(ToolkitError):
    """A config file or override that fails validation (every problem in one message)."""


class DataError(ToolkitError):
    """A data file that is missing, empty or fails `toolkit data validate`."""


class ModelSourceError(ToolkitError):
    """A model source that cannot be resolved to a local folder."""


class MissingExtraError(ToolkitError):
    """An optional backend is not installed; the message names the extra to install."""


class UnsupportedHardwareError(ToolkitError):
    """The chosen backend needs hardware this machine lacks (CUDA, AVX512...)."""


class StoreError(ToolkitError):
    """The feedback store cannot be reached, or its schema is newer than this toolkit."""
