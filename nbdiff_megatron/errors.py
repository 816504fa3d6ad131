"""One exception type per area a user can get wrong; the CLI prints their message without a traceback.

Each message names the field or file at fault and the fix.
"""


class NBDiffError(Exception):
    """Base class of the errors a user can cause (bad config, data, checkpoint, arguments)."""


class ConfigError(NBDiffError, ValueError):
    """A configuration field has a bad value, or fields disagree with each other."""


class DataError(NBDiffError):
    """Input data cannot be read, parsed or tokenized."""


class CheckpointError(NBDiffError):
    """A checkpoint is missing, incomplete or does not match the model."""


class ConversionError(NBDiffError):
    """A checkpoint cannot be converted between HF and megatron-core."""


class InferenceError(NBDiffError, ValueError):
    """A decoding request is invalid (empty prompt, too long, unknown checkpoint)."""


class CompatibilityError(NBDiffError):
    """The installed megatron-core lacks a field or feature this project passes to it."""


def checkpoint_read_errors() -> tuple[type[BaseException], ...]:
    """What reading a dist checkpoint can raise: torch.distributed.checkpoint's
    CheckpointException derives from BaseException only, so `except Exception` misses it (and
    megatron-core >= 0.19 reads even the common state through it)."""
    try:
        # lazy: torch.distributed.checkpoint imports in ~0.8 s; every command imports errors.py
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # an older torch: its errors are Exceptions
        return (Exception,)
    return (Exception, CheckpointException)
