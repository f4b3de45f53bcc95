"""Weights from a local folder: one ``model.safetensors`` or many shards named by
``model.safetensors.index.json``. The sha256 of the files goes into run manifests,
so a result can be tied to the exact weights that produced it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from local_backend.config import ModelConfig, ModelLoadError, read_json

if TYPE_CHECKING:
    from local_backend.model import Transformer

INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in a stable order."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, what="the weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no 'weight_map' object naming the shard of each tensor")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: names shard(s) not in the folder: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights (and no {INDEX_FILE}); "
                             "save the model with safe_serialization (the default of save_pretrained)")
    return files


def load_weights(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of every file, on the CPU, cast to ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: cannot read the weights ({exc}); "
                                 "the file may be truncated or not a safetensors file") from None
    return tensors


def weights_sha256(files: list[Path]) -> str:
    """sha256 over (file name, file bytes) of each weight file, in order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def load_model(folder: Path, config: ModelConfig, dtype: torch.dtype,
               device: torch.device | str) -> tuple["Transformer", str]:
    """The model with its weights on ``device``, and the weights' sha256."""
    from local_backend.model import Transformer

    files = weight_files(folder)
    tensors = load_weights(files, dtype)
    state = {}
    for key, tensor in tensors.items():
        name = key.removeprefix("model.")
        if "rotary_emb." in name or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue  # recomputed / shared with the embedding
        state[name] = tensor
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_few(unexpected)}")
        raise ModelLoadError(f"{folder}: the weights do not fit {config.architecture} as config.json "
                             f"describes it: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelLoadError(f"{folder}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, assign=True)
    return model.eval(), weights_sha256(files)


def _few(names: list[str], n: int = 4) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
