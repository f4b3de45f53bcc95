"""Tiny random Hugging Face models, saved offline with transformers, as the engine's
test subjects and transformers' own forward pass as the reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig,  # noqa: E402
                          Qwen2Config, Qwen3Config)

# The engine under test runs where the kernels compile: the GPU when there is one
# (the same tests then check the compiled Triton kernels), else the interpreter.
DEVICE = os.environ.get("DETAUDIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.2, bos_token_id=1, eos_token_id=2)

# name -> (config class, overrides): together they cover tied/untied embeddings, GQA,
# qkv bias, q/k norm with an explicit head_dim, and llama3 rope scaling.
FAMILIES = {
    "llama": (LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-mha-tied": (LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope": (LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (MistralConfig, dict(sliding_window=None, head_dim=16)),
    "qwen2": (Qwen2Config, dict(tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3": (Qwen3Config, dict(head_dim=32, tie_word_embeddings=False, use_sliding_window=False)),
}


def save_random_model(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A randomly initialised model of ``family`` in Hugging Face format (fp32)."""
    config_class, family_overrides = FAMILIES[family]
    config = config_class(**{**SMALL, **family_overrides, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def load_reference(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def pytest_generate_tests(metafunc):
    """A test that takes ``family`` runs once per model family."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", list(FAMILIES))


@pytest.fixture(scope="session")
def reference():
    """transformers' own model for a folder: the reference forward pass."""
    return load_reference


@pytest.fixture
def make_model(tmp_path):
    """save_random_model into a fresh folder: make_model(family, **config overrides)."""
    def make(family: str = "llama", name: str = "model", **overrides) -> Path:
        return save_random_model(tmp_path / name, family, **overrides)
    return make


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: save_random_model(root / name, name) for name in FAMILIES}


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CORPUS = [
    "Flip a coin. Return Heads or Tails only.",
    "Heads. Tails. Heads or Tails? The coin landed on Heads.",
    "Write one sentence about the sea. The sea is wide and the waves are grey.",
    "Tell a short story about a lighthouse keeper who lived alone by the sea.",
] * 20


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A random Llama with a real byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import json

    folder = tmp_path_factory.mktemp("chat_model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": CHAT_TEMPLATE}))
    vocab = tok.get_vocab_size()
    save_random_model(folder, "llama", seed=1, vocab_size=vocab,
                      bos_token_id=tok.token_to_id("<|bos|>"), eos_token_id=tok.token_to_id("<|eos|>"))
    return folder
