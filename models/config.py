"""Llama 3.x configurations: named presets and Hugging Face ``config.json``.

The presets copy the shapes of the released checkpoints (``config.json`` on the Hugging Face hub), so
a random-weight run of ``llama3.1-70b`` has exactly the memory traffic of the real model. ``tiny`` is
for tests: small enough for a 2-core CPU, but with GQA, llama3 RoPE scaling (all three frequency
bands of it) and untied embeddings, so it exercises every code path the big ones do.
"""

from __future__ import annotations

import dataclasses
import json
import os

__all__ = ["LlamaConfig", "RopeScaling", "PRESETS", "get_config", "from_hf_config"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 "llama3" RoPE frequency scaling (Hugging Face ``rope_scaling`` with that rope_type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of one Llama 3.x model. ``dtype`` is the weight and activation dtype."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    tie_embeddings: bool = False
    max_seq_len: int = 131072
    dtype: str = "bfloat16"

    def __post_init__(self):
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.name}: {field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{self.name}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head_dim, got {self.head_dim}")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def with_layers(self, n_layers: int | None) -> "LlamaConfig":
        """The same model truncated to its first ``n_layers`` layers (``None``: unchanged)."""
        if n_layers is None:
            return self
        if not isinstance(n_layers, int) or not 1 <= n_layers <= self.n_layers:
            raise ValueError(f"{self.name}: layer override must be in 1..{self.n_layers}, got {n_layers!r}")
        return self.replace(n_layers=n_layers)


PRESETS: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        LlamaConfig(
            name="tiny", vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8,
            ffn_dim=128, rope_theta=10000.0,
            rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64),
            max_seq_len=512, dtype="float32"),
        LlamaConfig(
            name="llama3.2-1b", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
            head_dim=64, ffn_dim=8192, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
        LlamaConfig(
            name="llama3.2-3b", vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
            head_dim=128, ffn_dim=8192, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
        LlamaConfig(
            name="llama3.1-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
            head_dim=128, ffn_dim=14336),
        LlamaConfig(
            name="llama3.1-70b", vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
            head_dim=128, ffn_dim=28672),
        LlamaConfig(
            name="llama3.1-405b", vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
            head_dim=128, ffn_dim=53248),
    )
}


def get_config(name: str, *, n_layers: int | None = None, dtype: str | None = None) -> LlamaConfig:
    """The preset called ``name``, optionally truncated to ``n_layers`` and cast to ``dtype``."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name].with_layers(n_layers)
    return cfg.replace(dtype=dtype) if dtype else cfg


def _rope_scaling(raw, where: str) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: rope_scaling must be an object or null, got {raw!r}")
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"{where}: unsupported rope_scaling type {kind!r} (only 'llama3')")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


def from_hf_config(path: str, *, n_layers: int | None = None, dtype: str | None = None) -> LlamaConfig:
    """Read a Hugging Face Llama ``config.json`` (the file, or the checkpoint folder holding it)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no Llama config.json at {path!r}")
    try:
        with open(file) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed config {file!r}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"malformed config {file!r}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", "llama") != "llama":
        raise ValueError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'llama'")
    # transformers >= 5 writes rope_theta and the scaling together as rope_parameters.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    try:
        n_heads = int(raw["num_attention_heads"])
        dim = int(raw["hidden_size"])
        cfg = LlamaConfig(
            name=os.path.basename(os.path.dirname(os.path.abspath(file))),
            vocab_size=int(raw["vocab_size"]),
            dim=dim,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
            head_dim=int(raw.get("head_dim") or dim // n_heads),
            ffn_dim=int(raw["intermediate_size"]),
            norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(rope, file),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_seq_len=int(raw.get("max_position_embeddings", 131072)),
        )
    except KeyError as e:
        raise ValueError(f"{file}: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: malformed field: {e}") from e
    cfg = cfg.with_layers(n_layers)
    return cfg.replace(dtype=dtype) if dtype else cfg
