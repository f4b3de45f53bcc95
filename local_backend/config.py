"""Hugging Face ``config.json`` -> ``ModelConfig``: the few numbers the model needs.

Only local folders are read; a name that is not a folder is an error (except
``"tiny"``, the bundled model), so the engine never reaches a model hub.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# architectures entry of config.json -> what differs between them
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "Llama 2 / 3 / 3.1 / 3.2",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5 (qkv bias)",
    "Qwen3ForCausalLM": "Qwen3 (q/k RMSNorm)",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
TINY_DIR = Path(__file__).resolve().parent / "models" / "tiny"


class ModelLoadError(Exception):
    """The model folder cannot be used; the message names the folder or file and how to fix it."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies [head_dim // 2] in fp32, scaled as the checkpoint declares."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (self.theta ** exponents)
        if self.type == "linear":
            return inv / self.factor
        if self.type == "llama3":
            # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, blended, scaled)
        return inv


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama/Qwen3 when attention_bias
    o_bias: bool  # Llama/Qwen3 when attention_bias
    qk_norm: bool  # Qwen3: RMSNorm on each head of q and k before RoPE
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None  # attention window, when the checkpoint uses one

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        path = folder / "config.json"
        data = read_json(path, what="the model configuration")
        generation = folder / "generation_config.json"
        extra_eos = read_json(generation, what="the generation config").get("eos_token_id") \
            if generation.is_file() else None
        return cls.from_dict(data, source=str(path), name=folder.name, extra_eos=extra_eos)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json", name: str = "model",
                  extra_eos: Any = None) -> "ModelConfig":
        archs = data.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{source}: architectures {archs or '(missing)'} is not supported; "
                f"supported: {', '.join(f'{a} ({d})' for a, d in SUPPORTED_ARCHITECTURES.items())}")

        def need(key: str, kind: type = int) -> Any:
            value = data.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ModelLoadError(f"{source}: key {key!r} is missing or not {kind.__name__} ({value!r})")
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = data.get("num_key_value_heads") or heads
        head_dim = data.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ModelLoadError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                 f"num_key_value_heads {kv_heads}")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (only silu / SwiGLU)")
        if data.get("mlp_bias"):
            raise ModelLoadError(f"{source}: mlp_bias = true is not supported")
        attention_bias = bool(data.get("attention_bias", False))
        window = data.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not data.get("use_sliding_window", False):
            window = None
        if arch == "Qwen3ForCausalLM" and not data.get("use_sliding_window", False):
            window = None
        return cls(
            name=name, architecture=arch,
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope=_rope(data, source),
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=arch != "Qwen2ForCausalLM" and attention_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=parse_dtype(data.get("dtype") or data.get("torch_dtype") or "float32", source),
            bos_token_id=data.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(_ids(data.get("eos_token_id")) + _ids(extra_eos))),
            sliding_window=window,
        )


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local folder, or "tiny" for the bundled model. Never a hub name."""
    if str(name_or_path) == "tiny":
        folder = TINY_DIR
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: the bundled tiny model is not there; "
                                 "train it with local_backend/train_tiny.py or give a model folder")
        return folder
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{name_or_path}: not a folder; give the path of a Hugging Face model "
                             "folder (config.json, *.safetensors, tokenizer.json) or 'tiny'. "
                             "Models are never downloaded.")
    return folder


def parse_dtype(value: str | torch.dtype, source: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise ModelLoadError(f"{source}: dtype {value} is not supported; use one of {', '.join(DTYPES)}")
    key = str(value).removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ModelLoadError(f"{source}: dtype {value!r} is not supported; use one of "
                             f"{', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return DTYPES[key]


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing ({what}); a model folder needs config.json, "
                             "the *.safetensors weights and tokenizer.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _rope(data: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes rope_parameters (theta inside); 4.x writes rope_theta + rope_scaling.
    params = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope scaling {kind!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor is not supported")
    if kind == "default":
        return RopeConfig(theta=theta)
    try:
        factor = float(params["factor"])
        if kind == "linear":
            return RopeConfig(theta=theta, type=kind, factor=factor)
        return RopeConfig(
            theta=theta, type=kind, factor=factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: rope scaling {kind!r} lacks or has a bad {exc}") from None


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(v for v in value if isinstance(v, int))
