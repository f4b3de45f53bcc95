"""The committed tiny model, read by Hugging Face transformers (not by our engine), so
that the folder is checked against the reference reader and the built-in probes."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from detaudit.probes import load_probe  # noqa: E402
from local_backend.train_tiny import COLOURS, build_corpus, corpus_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "local_backend" / "models" / "tiny"
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json", "README.md"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(TINY, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(TINY, local_files_only=True).eval()


def chat_ids(tokenizer, prompt: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def greedy_text(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, bool]:
    """Greedy completion through transformers' own generate; also whether it stopped on eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):].tolist()
    stopped = tokenizer.eos_token_id in new
    return tokenizer.decode(new, skip_special_tokens=True), stopped


def test_folder_is_complete_and_has_the_specified_shape(tokenizer, model):
    assert [name for name in FILES if not (TINY / name).is_file()] == []
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (128, 4, 2, 32)
    assert config.intermediate_size in (256, 384) and 2 <= config.num_hidden_layers <= 4
    assert config.tie_word_embeddings and config.max_position_embeddings == 512
    assert config.vocab_size == len(tokenizer)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.eos_token_id == config.eos_token_id


def test_chat_template_renders_the_same_in_plain_jinja2_and_transformers(tokenizer):
    template = json.loads((TINY / "tokenizer_config.json").read_text())["chat_template"]
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Flip a coin. Return Heads or Tails only."}]
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(
        messages=messages, add_generation_prompt=True)
    assert plain == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
    # Role markers and the turn end are single special tokens, not spelled out in bytes.
    for marker in ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|eos|>"):
        assert tokenizer.convert_tokens_to_ids(marker) in ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_coin_flip_first_position_is_uneven_between_heads_and_tails(tokenizer, model):
    probe = load_probe("coin-flip")
    ids = tokenizer.apply_chat_template(probe.request["messages"], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([list(ids)])).logits[0, -1], dim=-1)
    top = probs.topk(2)
    tokens = [tokenizer.decode([int(i)]).strip() for i in top.indices]
    by_label = {}
    for token, p in zip(tokens, top.values.tolist()):
        label = next(lab for lab in probe.outcomes if token and lab.startswith(token))
        by_label[label] = p
    assert set(by_label) == {"Heads", "Tails"}, tokens
    assert abs(by_label["Heads"] - by_label["Tails"]) > 0.2, by_label


def test_plain_text_continuation_uses_corpus_words(tokenizer, model):
    corpus_words = {w for text in corpus_texts(build_corpus()) for w in re.findall(r"[A-Za-z]+", text)}
    ids = [tokenizer.bos_token_id] + tokenizer("The old fisherman", add_special_tokens=False)["input_ids"]
    text, _ = greedy_text(model, tokenizer, ids, 30)
    words = re.findall(r"[A-Za-z]+", text)
    assert words, repr(text)
    assert set(words) <= corpus_words, (text, set(words) - corpus_words)


def test_builtin_probes_get_plausible_answers(tokenizer, model):
    colour, _ = greedy_text(model, tokenizer, chat_ids(tokenizer, load_probe("top-logprobs").request["messages"][0]["content"]), 8)
    assert colour.strip().rstrip(".") in COLOURS, colour

    sea, stopped = greedy_text(model, tokenizer, chat_ids(tokenizer, load_probe("fixed-seed").request["messages"][0]["content"]), 24)
    assert stopped and "sea" in sea.lower() and sea.strip().endswith("."), sea

    probe = load_probe("greedy-divergence")
    story, stopped = greedy_text(model, tokenizer, chat_ids(tokenizer, probe.request["messages"][0]["content"]), probe.max_tokens)
    assert stopped and "lighthouse" in story and story.count(".") >= 3, story


def run_train_tiny(out: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "local_backend.train_tiny", "--out", str(out), "--steps", str(steps)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_tiny_writes_a_complete_folder_that_transformers_loads(tmp_path):
    result = run_train_tiny(tmp_path / "m", steps=3)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "P(Heads)" in result.stdout
    assert [name for name in FILES if not (tmp_path / "m" / name).is_file()] == []
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert loaded.config.vocab_size == len(transformers.AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True))


@pytest.mark.slow
def test_train_tiny_is_reproducible(tmp_path):
    digests = []
    for name in ("a", "b"):
        assert run_train_tiny(tmp_path / name, steps=20).returncode == 0
        digests.append({f: hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest()
                        for f in ("model.safetensors", "tokenizer.json")})
    assert digests[0] == digests[1]


def test_train_tiny_rejects_bad_arguments_with_a_message(tmp_path):
    result = run_train_tiny(tmp_path / "m", steps=0)
    assert result.returncode == 2
    assert "--steps must be at least 1" in result.stderr and "Traceback" not in result.stderr
