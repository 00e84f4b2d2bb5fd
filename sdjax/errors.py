"""Errors sdjax raises for bad input. Each message names the problem and the fix."""


class SdjaxError(Exception):
    """Base class: a user-facing error (the CLI turns it into exit code 2)."""


class ConfigError(SdjaxError, ValueError):
    """A config.json field has a value sdjax does not support, or a required field is missing."""


class CheckpointError(SdjaxError, ValueError):
    """A weight file or folder is unreadable, incomplete, or does not fit the model."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for something other than tensors and plain containers."""


class KernelError(SdjaxError, ValueError):
    """An attention or conv implementation that does not exist or cannot run on this backend."""
