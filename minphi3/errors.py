"""The one exception family of minphi3.

Every error minphi3 raises on purpose is a `MinPhi3Error`. The messages say what was expected,
what was found, and where (a file, a config field, a tensor name), so that a user can act on
them without reading a traceback. The CLI prints them as one line and exits with status 2.
"""


class MinPhi3Error(Exception):
    """Base class of every error minphi3 raises on purpose."""


class ConfigError(MinPhi3Error):
    """A config.json (or GGUF metadata) that is missing, malformed or describes an unsupported model."""


class CheckpointError(MinPhi3Error):
    """A weight file that is missing, truncated, malformed, unsafe (pickle) or does not match the config."""


class TokenizerError(MinPhi3Error):
    """A tokenizer file that is missing or malformed, or a failure inside the tokenizers library."""


class GenerationError(MinPhi3Error):
    """Invalid generation input: empty or over-long prompt, ids out of range, bad sampling parameters."""


class BackendError(MinPhi3Error):
    """An array backend or dtype that is unknown or not available on this machine (no CuPy, no GPU)."""


class ResourceError(MinPhi3Error):
    """A request that needs more memory than this machine has."""
