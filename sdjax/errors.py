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


class UsageError(SdjaxError, ValueError):
    """Bad command-line input."""


class NetworkUsageError(SdjaxError, ValueError):
    """Bad LoRA / embedding / ControlNet / convert command-line input."""


class TaskError(SdjaxError, ValueError):
    """Bad img2img / inpainting / outpainting input (sizes, strength, masks, modes)."""


class PromptError(SdjaxError, ValueError):
    """A prompt uses A1111 syntax with a value that cannot be read (e.g. `(a:1..2)`)."""


class UnknownNameError(SdjaxError, ValueError):
    """A sampler or schedule name sdjax does not know, or a name whose baked-in schedule
    contradicts the schedule given beside it. The message lists the valid names."""


class ImageError(SdjaxError, OSError):
    """An image or output file cannot be read or written; the message names the file."""


class InfotextError(SdjaxError, ValueError):
    """A parameter cannot be written so that A1111 reads it back (e.g. a key with a comma)."""


class BatchError(SdjaxError, ValueError):
    """A malformed prompts file or an unusable output folder."""


class DatasetError(SdjaxError, ValueError):
    """A dataset folder or file is missing, incomplete or unreadable; the message names the file."""


class RequestError(TaskError):
    """A generation request with a value out of range or of the wrong type (`sdjax.pipeline.request`)."""


class NonFiniteError(TaskError):
    """Sampling or the VAE decode produced NaN / inf values."""


class NonFiniteLossError(SdjaxError, FloatingPointError):
    """Training met a NaN / inf loss or gradient, or was asked to export non-finite weights."""


class QueueFull(SdjaxError):
    """The server's queue holds `max_queue` jobs already, or it is shutting down (HTTP 503, not
    the 422 of other SdjaxErrors: `sdjax.serve.app` has a handler for this class)."""


class ServeInterrupted(SdjaxError):
    """Raised in the server's progress callback to stop the running batch (POST /sdapi/v1/interrupt)."""
