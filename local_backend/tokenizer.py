"""tokenizer.json + the chat template of tokenizer_config.json, without transformers.

Each token has its own bytes (byte-level BPE maps its printable characters back to
bytes; SentencePiece-style vocabularies spell a space as "▁" and raw bytes as
<0xNN>), so every generated token has its text, and a completion's text is the
concatenation of its tokens' bytes.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from local_backend.config import ModelLoadError, read_json

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TemplateError(ValueError):
    """The chat template could not render these messages."""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of byte-level BPE's byte -> printable character table (GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _special(value: Any) -> str | None:
    """tokenizer_config writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, folder: Path):
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing; the engine needs tokenizer.json for text in and out")
        try:
            self._tok = HFTokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"{path}: cannot read the tokenizer ({exc})") from None
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, "the tokenizer config") if config_path.is_file() else {}
        self.bos_token = _special(config.get("bos_token"))
        self.eos_token = _special(config.get("eos_token"))
        self.chat_template = _chat_template(folder, config)
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._bytes_cache: dict[int, bytes] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of a chat, ending where the assistant's reply begins."""
        if self.chat_template is None:
            raise TemplateError("this model has no chat template (tokenizer_config.json "
                                "'chat_template' or chat_template.jinja); send a prompt instead of messages")
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:
            raise TemplateError(f"the chat template failed on these messages: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template writes BOS itself, as transformers' apply_chat_template assumes.
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its own spelling, e.g. b"<|eot|>")."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            out = b""
        elif token_id in self.special_ids:
            out = piece.encode()
        elif self._byte_level and all(c in _unicode_to_byte() for c in piece):
            out = bytes(_unicode_to_byte()[c] for c in piece)
        elif m := _BYTE_TOKEN.match(piece):
            out = bytes([int(m.group(1), 16)])
        else:
            out = piece.replace("▁", " ").encode()
        self._bytes_cache[token_id] = out
        return out

    def token_text(self, token_id: int) -> str:
        """A token's text; a partial UTF-8 sequence is spelled with \\x escapes so that
        distinct tokens keep distinct texts."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated tokens: their bytes, concatenated (special tokens dropped)."""
        data = b"".join(self.token_bytes(t) for t in token_ids if t not in self.special_ids)
        return data.decode("utf-8", errors="replace")

    def first_generated_token(self, text: str) -> int | None:
        """The token the model starts ``text`` with as the first token of its reply."""
        if self.chat_template is not None:
            try:
                prompt = self.render_chat([{"role": "user", "content": "Hi"}])
            except TemplateError:
                prompt = None
            if prompt is not None:
                head = self.encode(prompt, add_special_tokens=False)
                full = self.encode(prompt + text, add_special_tokens=False)
                if full[:len(head)] == head and len(full) > len(head):
                    return full[len(head)]
        ids = self.encode(text, add_special_tokens=False)
        return ids[0] if ids else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Chat templates are untrusted code: render them in jinja2's sandbox, with the
    helpers Hugging Face templates expect."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template is not valid Jinja ({exc})") from None
