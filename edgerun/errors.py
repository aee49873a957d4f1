"""Errors a user can cause. Each message is one line that says what is wrong and what to do."""


class EdgerunError(Exception):
    """Base class of every error edgerun raises for bad input (paths, files, arguments)."""


class ModelNotFoundError(EdgerunError):
    """The model path or repo id does not name a usable model directory."""


class UnsupportedModelError(EdgerunError):
    """The checkpoint's architecture is not one edgerun implements."""


class CheckpointError(EdgerunError):
    """A checkpoint file is missing, truncated, or holds a tensor of the wrong name, shape or dtype."""


class TokenizerError(EdgerunError):
    """The tokenizer files are missing or unreadable, or the chat template cannot be rendered."""


class ContextLengthError(EdgerunError):
    """The prompt does not fit in the model's context window."""


class ArgumentError(EdgerunError, ValueError):
    """An argument of `edgerun.load` or a command is invalid (an unknown dtype or policy, a malformed size)."""


class GenerationError(EdgerunError):
    """Invalid generation arguments (sampling parameters, stop strings)."""


class TraceError(EdgerunError):
    """A routing trace is missing or malformed, or a replay asks for an impossible cache size."""


class BudgetError(EdgerunError):
    """The memory budget cannot hold the model (the message gives the minimum)."""
