"""Model folders: what loads (families, dtypes, shards, both config styles) and what
is refused with a ModelLoadError that names the file and says how to fix it."""

from __future__ import annotations

import json

import pytest
import torch

from local_backend.config import ModelConfig, ModelLoadError, resolve_model_dir
from local_backend.engine import Engine
from local_backend.loader import load_model, weight_files, weights_sha256
from tests.local.conftest import DEVICE


def load(folder, **kw):
    return Engine.load(folder, kernels="default", device=DEVICE, max_slots=2, max_len=32, **kw)


def test_family_features_are_read(model_dirs):
    llama = ModelConfig.from_folder(model_dirs["llama"])
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert not llama.tie_word_embeddings and not llama.qkv_bias and not llama.qk_norm
    qwen2 = ModelConfig.from_folder(model_dirs["qwen2"])
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    qwen3 = ModelConfig.from_folder(model_dirs["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 32  # explicit, not hidden / heads
    rope = ModelConfig.from_folder(model_dirs["llama3-rope"]).rope
    assert (rope.type, rope.factor, rope.original_max_position_embeddings) == ("llama3", 8.0, 16)


def test_transformers_4_config_style_is_read(model_dirs):
    """Older checkpoints put rope_theta at the top and call the scaling rope_scaling."""
    data = json.loads((model_dirs["llama"] / "config.json").read_text())
    data.pop("rope_parameters", None)
    data.update(rope_theta=1234.0, torch_dtype="bfloat16",
                rope_scaling={"type": "linear", "factor": 2.0})
    data.pop("dtype", None)
    config = ModelConfig.from_dict(data)
    assert (config.rope.theta, config.rope.type, config.rope.factor) == (1234.0, "linear", 2.0)
    assert config.dtype == torch.bfloat16


def test_dtype_override_and_hash(model_dirs, make_model):
    engine = load(model_dirs["llama"], dtype="bf16")
    assert engine.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert engine.describe()["dtype"] == "bfloat16"
    same = load(model_dirs["llama"])
    other = load(make_model("llama", seed=5))
    assert len(same.weights_sha256) == 64
    assert engine.weights_sha256 == same.weights_sha256 != other.weights_sha256


def test_sharded_weights_load_like_one_file(model_dirs, tmp_path, reference):
    model = reference(model_dirs["llama"])
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(weight_files(tmp_path)) > 1
    config = ModelConfig.from_folder(tmp_path)
    sharded, _ = load_model(tmp_path, config, torch.float32, "cpu")
    whole, _ = load_model(model_dirs["llama"], config, torch.float32, "cpu")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name


# ---- broken folders -------------------------------------------------------------

def broken_copy(src, dst, **changes):
    """A copy of a model folder with files removed (None), replaced (str/bytes) or edited (callable)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    for name, change in changes.items():
        path = dst / name.replace("__", ".")
        if change is None:
            path.unlink()
        elif callable(change):
            path.write_text(json.dumps(change(json.loads(path.read_text()))))
        else:
            path.write_bytes(change if isinstance(change, bytes) else change.encode())
    return dst


@pytest.mark.parametrize("changes, expected", [
    ({"config__json": None}, r"config\.json: missing"),
    ({"config__json": "{not json"}, r"config\.json: not valid JSON"),
    ({"config__json": lambda c: {**c, "architectures": ["GPT2LMHeadModel"]}},
     r"GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM"),
    ({"config__json": lambda c: {**c, "rope_parameters": {"rope_type": "longrope", "factor": 2.0}}},
     r"rope scaling 'longrope' is not supported"),
    ({"config__json": lambda c: {**c, "hidden_size": "sixty-four"}}, r"'hidden_size' is missing or not int"),
    ({"model__safetensors": None}, r"no \*\.safetensors weights"),
    ({"model__safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00truncated"}, r"model\.safetensors: cannot read"),
    ({"config__json": lambda c: {**c, "num_hidden_layers": 3}}, r"missing tensors layers\.2\."),
    ({"config__json": lambda c: {**c, "intermediate_size": 96}}, r"has shape .* config\.json implies"),
    ({"model__safetensors__index__json": json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})},
     r"names shard\(s\) not in the folder: model-00001-of-00002"),
])
def test_broken_folder_gives_a_clear_error(model_dirs, tmp_path, changes, expected):
    folder = broken_copy(model_dirs["llama"], tmp_path / "broken", **changes)
    with pytest.raises(ModelLoadError, match=expected) as info:
        load(folder)
    assert str(folder) in str(info.value)


def test_a_hub_name_is_never_downloaded():
    with pytest.raises(ModelLoadError, match="not a folder.*never downloaded"):
        resolve_model_dir("meta-llama/Llama-3.2-1B-Instruct")


def test_unknown_kernels_and_devices_are_refused(model_dirs):
    with pytest.raises(ModelLoadError, match="unknown kernels 'fast'"):
        Engine.load(model_dirs["llama"], kernels="fast")
    with pytest.raises(ModelLoadError, match="unknown kernel implementation 'numba'"):
        Engine.load(model_dirs["llama"], kernel_impl="numba")
    if DEVICE == "cuda":
        with pytest.raises(ModelLoadError, match="cpu-exact kernels run on the CPU only"):
            Engine.load(model_dirs["llama"], kernel_impl="cpu-exact", device="cuda")
    with pytest.raises(ModelLoadError, match="dtype 'int8' is not supported"):
        load(model_dirs["llama"], dtype="int8")


def test_describe_names_what_produced_the_numbers(model_dirs):
    facts = load(model_dirs["qwen3"]).describe()
    assert facts["kernels"] == "default" and facts["device"] == DEVICE
    assert facts["architecture"] == "Qwen3ForCausalLM" and facts["torch"] == torch.__version__
    assert facts["weights_sha256"] == weights_sha256(weight_files(model_dirs["qwen3"]))
