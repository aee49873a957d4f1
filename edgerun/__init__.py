"""edgerun: run huge Mixture-of-Experts language models on consumer hardware.

    import edgerun
    model = edgerun.load("path/to/Mixtral-8x7B-Instruct")
    print(model.chat([{"role": "user", "content": "Hello!"}]))
"""

from .api import Model, load
from .errors import (
    ArgumentError,
    BudgetError,
    CheckpointError,
    ContextLengthError,
    EdgerunError,
    GenerationError,
    ModelNotFoundError,
    TokenizerError,
    TraceError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
__all__ = [
    "load", "Model", "EdgerunError", "ArgumentError", "ModelNotFoundError", "UnsupportedModelError",
    "CheckpointError", "TokenizerError", "ContextLengthError", "GenerationError", "BudgetError", "TraceError",
]
