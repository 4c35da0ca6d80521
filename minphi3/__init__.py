"""minphi3: the Phi-3 family of language models written out in NumPy, every step readable.

    import minphi3
    model = minphi3.load("path/to/checkpoint")            # config.json + safetensors, or .gguf
    out = model([[1, 2, 3]])                               # out.logits: [batch, seq, vocab]
    minphi3.to_numpy(out.logits)                           # a host copy, whatever the backend
"""

from .backend import to_numpy
from .config import ModelConfig, load_config
from .errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    GenerationError,
    MinPhi3Error,
    ResourceError,
    TokenizerError,
)
from .generate import GenerationStats, TextStreamer, generate
from .loading import load
from .model import Model, ModelOutput
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CheckpointError",
    "ConfigError",
    "GenerationError",
    "GenerationStats",
    "MinPhi3Error",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "ResourceError",
    "TokenizerError",
    "TextStreamer",
    "Tokenizer",
    "generate",
    "load",
    "load_tokenizer",
    "load_config",
    "to_numpy",
]
