"""The model configuration: a frozen dataclass read from `config.json`, validated once.

Field names are those of `config.json`, so `model.config.num_key_value_heads` means what the
checkpoint says. Two spellings of the rotary settings exist in the wild and both are read:

- published checkpoints: `rope_scaling` (`{"type": "su" | "longrope", ...}`) with top-level
  `rope_theta`, `partial_rotary_factor` and `original_max_position_embeddings`;
- transformers 5 `save_pretrained`: `rope_parameters` (`{"rope_type": ..., "rope_theta": ...,
  "partial_rotary_factor": ...}`) and a top-level `original_max_position_embeddings`.

Derived values (`head_dim`, `rotary_dim`, `kv_groups`, `attention_factor`) are properties, computed
from the fields, never stored twice. So are the read-only aliases for transformers 5's spellings:
`config.rope_parameters` (the rotary settings as one mapping) and `config.dtype` (`torch_dtype`).
Every problem raises `ConfigError` naming the field.

Rope scaling: Phi-3 checkpoints may use LongRoPE (`longrope`, also spelled `su` or `yarn`); Phi
checkpoints may use `linear` scaling (every frequency divided by `factor`, as transformers'
PhiRotaryEmbedding does). Any other rope type is refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

PHI3_ARCHITECTURES = (
    "Phi3ForCausalLM",
    "Phi3ForSequenceClassification",
    "Phi3ForTokenClassification",
)
PHI_ARCHITECTURES = (
    "PhiForCausalLM",
    "PhiForSequenceClassification",
    "PhiForTokenClassification",
)
# Architectures people will try that are *not* this layout: refuse them by name.
KNOWN_UNSUPPORTED = {
    "Phi3SmallForCausalLM": "Phi-3-small uses block-sparse attention, GEGLU and a tiktoken vocabulary",
    "Phi3VForCausalLM": "Phi-3-vision adds an image encoder",
    "PhiMoEForCausalLM": "Phi-3.5-MoE is a mixture-of-experts model",
    "Phi4MMForCausalLM": "Phi-4-multimodal adds vision and audio encoders",
}
LONGROPE_SPELLINGS = ("longrope", "su", "yarn")
PHI_ROPE_TYPES = ("linear",)  # rope_scaling types PhiForCausalLM runs here, besides no scaling


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are scaled: "longrope" (Phi-3) or "linear" (Phi).

    longrope: short_factor, long_factor: [rotary_dim / 2] per-pair wavelength factors for short
    and long contexts; factor: optional override of max_position_embeddings /
    original_max_position_embeddings; attention_factor: optional override of the cos/sin scale
    ("mscale").
    linear: factor: every frequency is divided by it (positions squeezed `factor` times); the
    factor lists stay empty.
    """

    rope_type: str
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    factor: float | None = None
    attention_factor: float | None = None

    def __getitem__(self, key: str):
        """Dict-style access (`config.rope_scaling["long_factor"]`), as in config.json, where
        published files spell the type "type" (transformers 5 writes "rope_type"): both work."""
        if key == "type":
            key = "rope_type"
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        """`dict.get` for the same keys as `[]`."""
        try:
            return self[key]
        except KeyError:
            return default


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything in `config.json` that changes the math, for the Phi-3 and Phi families.

    model_type is "phi3" (Phi3ForCausalLM: Phi-3, Phi-3.5, Phi-4-mini, phi-4) or "phi"
    (PhiForCausalLM: phi-1, phi-1.5, phi-2).
    """

    model_type: str
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: RopeScaling | None = None
    original_max_position_embeddings: int | None = None
    sliding_window: int | None = None
    head_dim_override: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float | None = 1e-5
    layer_norm_eps: float | None = None
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    num_labels: int = 2
    id2label: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    problem_type: str | None = None
    torch_dtype: str | None = None

    # ---- derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head: hidden_size / num_attention_heads unless config.json sets it."""
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head rotate: int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_groups(self) -> int:
        """How many query heads share one key/value head (1 for multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def uses_longrope(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling.rope_type == "longrope"

    @property
    def attention_factor(self) -> float:
        """The scale of LongRoPE's cos and sin tables, 1.0 without LongRoPE.

        attention_factor = rope_scaling.attention_factor if given, else
        sqrt(1 + ln s / ln original_max) with s = rope_scaling.factor or
        max_position_embeddings / original_max, and 1.0 when s <= 1.
        """
        if not self.uses_longrope:  # linear scaling leaves cos and sin unscaled
            return 1.0
        if self.rope_scaling.attention_factor is not None:
            return float(self.rope_scaling.attention_factor)
        original = self.original_max_position_embeddings or self.max_position_embeddings
        scale = self.rope_scaling.factor
        if scale is None:
            scale = self.max_position_embeddings / original
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(scale) / math.log(original))

    # ---- transformers 5 spellings (read-only aliases) --------------------------------------------
    @property
    def dtype(self) -> str | None:
        """config.json's `dtype` (transformers 5's name for `torch_dtype`): the stored weights' dtype."""
        return self.torch_dtype

    @property
    def rope_parameters(self) -> MappingProxyType:
        """The rotary settings in transformers 5's `rope_parameters` layout, read-only.

        -> {"rope_type": "default" | "longrope" | "linear", "rope_theta", "partial_rotary_factor",
        and with scaling its fields: "short_factor", "long_factor", "original_max_position_embeddings"
        (longrope), "factor", "attention_factor" (when config.json sets them)}. Built from the fields
        on each access, whichever spelling config.json used, so it can never disagree with them.
        """
        parameters = {"rope_type": "default", "rope_theta": self.rope_theta,
                      "partial_rotary_factor": self.partial_rotary_factor}
        scaling = self.rope_scaling
        if scaling is not None:
            parameters["rope_type"] = scaling.rope_type
            if scaling.rope_type == "longrope":
                parameters["short_factor"] = scaling.short_factor
                parameters["long_factor"] = scaling.long_factor
                parameters["original_max_position_embeddings"] = self.original_max_position_embeddings
            for name in ("factor", "attention_factor"):
                if getattr(scaling, name) is not None:
                    parameters[name] = getattr(scaling, name)
        return MappingProxyType(parameters)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The config's end-of-sequence ids as a tuple (config.json allows an int or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, tuple):
            return self.eos_token_id
        return (self.eos_token_id,)

    @property
    def is_phi3(self) -> bool:
        return self.model_type == "phi3"

    @property
    def head_kind(self) -> str:
        """Which head sits on the decoder: "causal_lm", "sequence_classification" or "token_classification"."""
        architecture = self.architectures[0] if self.architectures else ""
        if architecture.endswith("ForSequenceClassification"):
            return "sequence_classification"
        if architecture.endswith("ForTokenClassification"):
            return "token_classification"
        return "causal_lm"

    def num_parameters(self) -> int:
        """Parameters the checkpoint holds, computed from the shapes (for memory checks)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        embedding = self.vocab_size * h
        if self.is_phi3:
            per_layer = h * (q_width + 2 * kv_width) + q_width * h + 2 * i * h + i * h + 2 * h
            final = h
        else:
            per_layer = (h + 1) * (q_width + 2 * kv_width) + (q_width + 1) * h + (h + 1) * i + (i + 1) * h + 2 * h
            if self.qk_layernorm:
                per_layer += 4 * self.head_dim
            final = 2 * h
        head = (0 if self.tie_word_embeddings else self.vocab_size * h) + (0 if self.is_phi3 else self.vocab_size)
        if self.head_kind != "causal_lm":
            head = self.num_labels * h + (self.num_labels if self.head_kind == "token_classification" else 0)
        return embedding + layers * per_layer + final + head


# ---- reading --------------------------------------------------------------------------------
def load_config(path) -> ModelConfig:
    """Read and validate `config.json` from a checkpoint folder (or the file itself)."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: file not found (a checkpoint folder needs a config.json)")
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read the file ({exc})") from None
    if not text.strip():
        raise ConfigError(f"{config_path}: the file is empty; expected a JSON object")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or a number of 5000 digits
        raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
    return config_from_dict(data, source=str(config_path))


def config_from_dict(data: Any, source: str = "config.json") -> ModelConfig:
    """Build and validate a ModelConfig from a parsed config.json object."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
    _refuse_huge_integers(data, source)
    fields = _FieldReader(data, source)
    architectures = _read_architectures(fields)
    model_type = data.get("model_type")
    if model_type is None:
        model_type = "phi" if architectures[0] in PHI_ARCHITECTURES else "phi3"
    if model_type == "phi3" and architectures[0] in PHI_ARCHITECTURES:
        raise ConfigError(f"{source}: model_type 'phi3' does not match architecture {architectures[0]}")
    if model_type == "phi3":
        config = _phi3_config(fields, architectures)
    elif model_type == "phi":
        config = _phi_config(fields, architectures)
    else:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; minphi3 runs 'phi3' "
            "(Phi-3, Phi-3.5, Phi-4-mini, phi-4) and 'phi' (phi-1, phi-1.5, phi-2)"
        )
    validate_config(config, source)
    return config


def _refuse_huge_integers(data: dict, source: str) -> None:
    """Every integer in config.json must fit in 64 bits (sizes become NumPy shapes and indices).

    JSON integers have no size limit in Python: a 400-digit vocab_size would otherwise reach a float
    conversion (OverflowError) or an error message (repr refuses ints over 4300 digits).
    """
    stack = [("", data)]
    while stack:  # iterative: nesting depth is whatever the JSON parser allowed
        where, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ConfigError(
                f"{source}: field {where!r} is an integer of {value.bit_length()} bits; config.json numbers must fit in 64 bits"
            )


def _read_architectures(fields: _FieldReader) -> tuple[str, ...]:
    raw = fields.data.get("architectures")
    if raw is None:
        model_type = fields.data.get("model_type")
        if model_type == "phi":
            return ("PhiForCausalLM",)
        if model_type in (None, "phi3"):
            return ("Phi3ForCausalLM",)
        raise ConfigError(f"{fields.source}: model_type {model_type!r} is not supported")
    if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
        raise ConfigError(f"{fields.source}: field 'architectures' must be a non-empty list of strings, found {raw!r}")
    architecture = raw[0]
    if architecture in KNOWN_UNSUPPORTED:
        raise ConfigError(
            f"{fields.source}: architecture {architecture} is not supported: {KNOWN_UNSUPPORTED[architecture]}; "
            f"minphi3 runs {', '.join(PHI3_ARCHITECTURES + PHI_ARCHITECTURES)}"
        )
    if architecture not in PHI3_ARCHITECTURES + PHI_ARCHITECTURES:
        raise ConfigError(
            f"{fields.source}: architecture {architecture} is not supported; "
            f"minphi3 runs {', '.join(PHI3_ARCHITECTURES + PHI_ARCHITECTURES)}"
        )
    return tuple(raw)


def _common_fields(fields: _FieldReader, architectures: tuple[str, ...]) -> dict:
    """Fields shared by both families."""
    heads = fields.positive_int("num_attention_heads")
    kv_heads = fields.optional_positive_int("num_key_value_heads")
    id2label = fields.data.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ConfigError(f"{fields.source}: field 'id2label' must be an object, found {type(id2label).__name__}")
    num_labels = fields.data.get("num_labels", len(id2label) or 2)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigError(f"{fields.source}: field 'num_labels' must be a positive integer, found {num_labels!r}")
    rope_parameters = fields.data.get("rope_parameters")
    rope_parameters = rope_parameters if isinstance(rope_parameters, dict) else {}
    return dict(
        architectures=architectures,
        vocab_size=fields.positive_int("vocab_size"),
        hidden_size=fields.positive_int("hidden_size"),
        intermediate_size=fields.positive_int("intermediate_size"),
        num_hidden_layers=fields.positive_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads if kv_heads is not None else heads,
        max_position_embeddings=fields.positive_int("max_position_embeddings"),
        rope_theta=_rope_theta(fields, rope_parameters),
        head_dim_override=fields.optional_positive_int("head_dim"),
        hidden_act=fields.string("hidden_act", "silu"),
        tie_word_embeddings=fields.boolean("tie_word_embeddings", False),
        bos_token_id=fields.optional_token_id("bos_token_id"),
        eos_token_id=fields.optional_token_ids("eos_token_id"),
        pad_token_id=fields.optional_token_id("pad_token_id"),
        num_labels=num_labels,
        id2label=MappingProxyType(_labels_by_id(id2label)),
        problem_type=fields.data.get("problem_type") if isinstance(fields.data.get("problem_type"), str) else None,
        torch_dtype=fields.data.get("torch_dtype") or fields.data.get("dtype"),
    )


def _labels_by_id(id2label: dict) -> dict[int, str]:
    """config.json's id2label with integer keys; keys that are not integers ("x", "--5") are dropped."""
    labels = {}
    for key, value in id2label.items():
        try:
            labels[int(key)] = str(value)
        except ValueError:
            continue
    return labels


def _rope_theta(fields: _FieldReader, rope_parameters: dict) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or the top level (published files)."""
    theta = rope_parameters.get("rope_theta", fields.data.get("rope_theta", 10000.0))
    # Above 1, so that the frequencies theta**(-2i/d) fall from 1 as RoPE's do (every published
    # value is 10^4 or more); a tiny theta overflows them to inf, and the logits to NaN.
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (theta > 1 and math.isfinite(theta)):
        raise ConfigError(f"{fields.source}: field 'rope_theta' must be a finite number above 1, found {theta!r}")
    return float(theta)


def _partial_rotary_factor(fields: _FieldReader, rope_parameters: dict, default: float) -> float:
    value = rope_parameters.get("partial_rotary_factor", fields.data.get("partial_rotary_factor", default))
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{fields.source}: field 'partial_rotary_factor' must be in (0, 1], found {value!r}")
    return float(value)


def _phi3_config(fields: _FieldReader, architectures: tuple[str, ...]) -> ModelConfig:
    common = _common_fields(fields, architectures)
    scaling_dict = _rope_scaling_dict(fields)
    rope_parameters = fields.data.get("rope_parameters")
    rope_parameters = rope_parameters if isinstance(rope_parameters, dict) else {}
    partial = _partial_rotary_factor(fields, scaling_dict or rope_parameters, 1.0)
    # The top-level field, else Phi3Config's default 4096, never a value inside the scaling dict:
    # transformers overwrites that one with the top-level value (`standardize_rope_params`), and
    # writes both when it saves.
    original_max = fields.optional_positive_int("original_max_position_embeddings")
    if original_max is None:
        original_max = 4096
    return ModelConfig(
        model_type="phi3",
        partial_rotary_factor=partial,
        rope_scaling=_read_longrope(scaling_dict, fields.source),
        original_max_position_embeddings=original_max,
        sliding_window=fields.optional_positive_int("sliding_window"),
        rms_norm_eps=fields.positive_float("rms_norm_eps", 1e-5),
        **common,
    )


def _phi_config(fields: _FieldReader, architectures: tuple[str, ...]) -> ModelConfig:
    """PhiForCausalLM (phi-1, phi-1.5, phi-2): LayerNorm, parallel block, partial rotary 0.5 by default."""
    common = _common_fields(fields, architectures)
    rope_parameters = fields.data.get("rope_parameters")
    rope_parameters = rope_parameters if isinstance(rope_parameters, dict) else {}
    common["hidden_act"] = fields.string("hidden_act", "gelu_new")
    return ModelConfig(
        model_type="phi",
        partial_rotary_factor=_partial_rotary_factor(fields, rope_parameters, 0.5),
        rope_scaling=_read_phi_rope_scaling(fields),
        rms_norm_eps=None,
        layer_norm_eps=fields.positive_float("layer_norm_eps", 1e-5),
        qk_layernorm=fields.boolean("qk_layernorm", False),
        **common,
    )


def _scaling_entry(fields: _FieldReader) -> tuple[str, dict] | None:
    """(key, dict) of the first of `rope_scaling`, `rope_parameters` that asks for scaling, or None.

    rope_type "default" (under either key, or a dict with no type) is transformers' spelling of
    no scaling: transformers 5 writes `rope_parameters: {"rope_type": "default", ...}` when it
    saves, and accepts `rope_scaling: {"rope_type": "default"}`, running plain RoPE for both.
    """
    for key in ("rope_scaling", "rope_parameters"):
        value = fields.data.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{fields.source}: field {key!r} must be an object or null, found {type(value).__name__}")
        if _rope_type(value) == "default":
            continue
        return key, value
    return None


def _rope_type(scaling: dict):
    return scaling.get("rope_type", scaling.get("type", "default"))


def _rope_scaling_dict(fields: _FieldReader) -> dict | None:
    """The LongRoPE dict from `rope_scaling` or `rope_parameters`, or None for plain RoPE (Phi-3)."""
    entry = _scaling_entry(fields)
    if entry is None:
        return None
    key, value = entry
    if _rope_type(value) not in LONGROPE_SPELLINGS:
        raise ConfigError(
            f"{fields.source}: field '{key}.rope_type' is {_rope_type(value)!r}; Phi-3 models support "
            "'longrope' (also spelled 'su' or 'yarn') or no scaling"
        )
    return value


def _read_phi_rope_scaling(fields: _FieldReader) -> RopeScaling | None:
    """Phi's rope scaling: `linear` (frequencies divided by `factor`) or none (phi-1/1.5/2 use none)."""
    entry = _scaling_entry(fields)
    if entry is None:
        return None
    key, value = entry
    rope_type = _rope_type(value)
    if rope_type not in PHI_ROPE_TYPES:
        raise ConfigError(
            f"{fields.source}: field '{key}.rope_type' is {rope_type!r}; Phi models (phi-1, phi-1.5, phi-2, "
            f"PhiForCausalLM) support {', '.join(repr(t) for t in PHI_ROPE_TYPES)} rope scaling or no scaling"
        )
    factor = value.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (factor > 0 and math.isfinite(factor)):
        raise ConfigError(f"{fields.source}: field '{key}.factor' must be a positive finite number, found {factor!r}")
    return RopeScaling(rope_type=rope_type, factor=float(factor))


def _read_longrope(scaling: dict | None, source: str) -> RopeScaling | None:
    if scaling is None:
        return None
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = scaling.get(name)
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
        ):
            raise ConfigError(f"{source}: field 'rope_scaling.{name}' must be a list of positive numbers, found {values!r}"[:300])
        factors[name] = tuple(float(v) for v in values)
    optional = {}
    for name in ("factor", "attention_factor"):
        value = scaling.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value))
        ):
            raise ConfigError(f"{source}: field 'rope_scaling.{name}' must be a positive finite number, found {value!r}")
        optional[name] = None if value is None else float(value)
    return RopeScaling(rope_type="longrope", **factors, **optional)


# ---- validation -----------------------------------------------------------------------------
def validate_config(config: ModelConfig, source: str = "config.json") -> None:
    """Check the relations between fields; raise ConfigError naming the field."""
    if config.head_dim_override is None and config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"{source}: field 'hidden_size' ({config.hidden_size}) must be divisible by "
            f"'num_attention_heads' ({config.num_attention_heads})"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(
            f"{source}: field 'num_attention_heads' ({config.num_attention_heads}) must be divisible by "
            f"'num_key_value_heads' ({config.num_key_value_heads})"
        )
    if config.rotary_dim < 2 or config.rotary_dim % 2:
        raise ConfigError(
            f"{source}: field 'partial_rotary_factor' ({config.partial_rotary_factor}) gives rotary_dim "
            f"{config.rotary_dim} for head_dim {config.head_dim}; it must be a positive even number"
        )
    if config.uses_longrope:
        if config.rope_scaling.attention_factor is None and (config.original_max_position_embeddings or 2) < 2:
            # The attention factor divides by log(original_max): 0 for a context of 1.
            raise ConfigError(
                f"{source}: field 'original_max_position_embeddings' must be at least 2 for LongRoPE, "
                f"found {config.original_max_position_embeddings}"
            )
        for name in ("short_factor", "long_factor"):
            found = len(getattr(config.rope_scaling, name))
            if found != config.rotary_dim // 2:
                raise ConfigError(
                    f"{source}: field 'rope_scaling.{name}' has {found} entries; expected rotary_dim/2 = "
                    f"{config.rotary_dim // 2} (head_dim {config.head_dim} x partial_rotary_factor "
                    f"{config.partial_rotary_factor})"
                )
    if config.hidden_act not in ("silu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"{source}: field 'hidden_act' is {config.hidden_act!r}; supported: silu, gelu_new")
    if config.is_phi3 and config.hidden_act != "silu":
        raise ConfigError(f"{source}: field 'hidden_act' is {config.hidden_act!r}; Phi-3 models use 'silu'")
    if not config.is_phi3 and config.hidden_act == "silu":
        # gelu_mlp always applies the tanh GELU (gelu_pytorch_tanh is the same formula fused)
        raise ConfigError(f"{source}: field 'hidden_act' is 'silu'; phi-1/1.5/2 models use 'gelu_new'")
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(config, name)
        if value is not None and value >= config.vocab_size:
            raise ConfigError(f"{source}: field {name!r} ({value}) is not below vocab_size ({config.vocab_size})")
    for value in config.eos_token_ids:
        if value >= config.vocab_size:
            raise ConfigError(f"{source}: field 'eos_token_id' ({value}) is not below vocab_size ({config.vocab_size})")


class _FieldReader:
    """Typed access to a config.json object, with errors that name the field."""

    def __init__(self, data: dict, source: str):
        self.data = data
        self.source = source

    def _fail(self, key: str, expected: str):
        raise ConfigError(f"{self.source}: field {key!r} must be {expected}, found {self.data.get(key)!r}"[:400])

    def positive_int(self, key: str) -> int:
        if key not in self.data:
            raise ConfigError(f"{self.source}: required field {key!r} is missing")
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self._fail(key, "a positive integer")
        return value

    def optional_positive_int(self, key: str) -> int | None:
        if self.data.get(key) is None:
            return None
        return self.positive_int(key)

    def positive_float(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            self._fail(key, "a positive number")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._fail(key, "true or false")
        return value

    def string(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            self._fail(key, "a string")
        return value

    def optional_token_id(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self._fail(key, "a non-negative integer or null")
        return value

    def optional_token_ids(self, key: str) -> int | tuple[int, ...] | None:
        value = self.data.get(key)
        if isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                self._fail(key, "a non-negative integer, a list of them, or null")
            return tuple(value)
        return self.optional_token_id(key)
