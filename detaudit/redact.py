"""Secrets never reach a terminal or a file: the one function every message passes through.

Servers echo what they got (``Incorrect API key provided: sk-...``, a proxy's error
page that repeats the request headers), and exception texts can carry URLs with a
``user:password@``. Every error message, stored or printed, goes through ``redact``:

- each secret this process read (``register``: the API key, a URL's password) is
  replaced, and so is any piece of it of ``FRAGMENT`` characters or more, so a key cut
  in half by a shortened message is caught too;
- whatever looks like a credential is masked even if it was never registered:
  ``Bearer <token>``, ``sk-...`` style keys, ``user:password@`` in URLs, and the value
  after ``api_key=``, ``Authorization:`` and the like.

``api_key_env_problem`` is the rule for ``--api-key-env``: it takes a variable's
NAME, and a value that looks like a key is refused without being shown.
"""

from __future__ import annotations

import re

MASK = "***"
FRAGMENT = 10  # a piece of a registered secret this long is masked too
_MIN_SECRET = 8  # shorter values ("EMPTY", "none", "test": local servers' dummies) are no
# secret, and masking them would garble ordinary words in messages
_secrets: set[str] = set()

_PATTERNS = [
    # Bearer <token>, wherever it appears
    (re.compile(r"(?i)\b(bearer\s+)(?!\*\*\*)[A-Za-z0-9._~+/=-]{6,}"), r"\1" + MASK),
    # provider keys: sk-..., sk-proj-..., rk-..., pk-... (OpenAI, Anthropic, Stripe style)
    (re.compile(r"\b(sk|rk|pk)-(?!\*\*\*)[A-Za-z0-9_-]{12,}"), r"\1-" + MASK),
    # scheme://user:password@host (or scheme://token@host)
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@"), r"\1" + MASK + "@"),
    # Authorization: <scheme> <credentials>
    (re.compile(r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?>(?:[a-z]+\s+)?))"
                r"(?!\*\*\*)[^\s\"'&,;}]{4,}"), r"\1" + MASK),
    # api_key=..., "api-key": "...", x-api-key: ..., password=... (not a path's last part:
    # "results/secret: no such run folder" names a folder, it gives no secret)
    (re.compile(r"(?i)((?<![/\\])\b(?:x-)?(?:api[_-]?key|access[_-]?token|auth[_-]?token|password|"
                r"passwd|secret)[\"']?\s*[:=]\s*[\"']?)(?!\*\*\*)[^\s\"'&,;}]{4,}"),
     r"\1" + MASK),
]


def register(secret: str | None) -> None:
    """Remember a value that must never be printed or stored (an API key, a password)."""
    if secret and len(secret.strip()) >= _MIN_SECRET:
        _secrets.add(secret.strip())


def redact(text: str) -> str:
    """``text`` with every registered secret (or a piece of one) and every
    credential-looking token replaced by ``***``."""
    if not text:
        return text
    # Credential shapes first: a key-shaped token goes whole, whatever pieces of other
    # registered secrets it happens to contain.
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = _mask_secret(text, secret)
    return text


def _mask_secret(text: str, secret: str) -> str:
    if secret in text:
        text = text.replace(secret, MASK)
    if len(secret) <= FRAGMENT:
        return text
    windows = {secret[i:i + FRAGMENT]: i for i in range(len(secret) - FRAGMENT + 1)}
    # str.find runs in C: the common case (no piece of the key) costs a few scans.
    while True:
        hits = [(at, offset) for piece, offset in windows.items()
                if (at := text.find(piece)) >= 0]
        if not hits:
            return text
        at, offset = min(hits)
        start, end = at, at + FRAGMENT  # grow the match as far as it follows the secret
        left, right = offset, offset + FRAGMENT
        while start > 0 and left > 0 and text[start - 1] == secret[left - 1]:
            start, left = start - 1, left - 1
        while end < len(text) and right < len(secret) and text[end] == secret[right]:
            end, right = end + 1, right + 1
        text = text[:start] + MASK + text[end:]


# -- --api-key-env ---------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def looks_like_key(name: str) -> bool:
    """True for a value that is not a plausible environment variable NAME: a provider
    key (``sk-...``), anything with characters a name cannot have, or a long mixed-case
    string with digits (``AIzaSy...``) rather than ``SOME_PROVIDER_API_KEY``."""
    if name.startswith(("sk-", "sk_", "rk-", "pk-")) or not _ENV_NAME.fullmatch(name):
        return True
    if len(name) > 128:
        return True
    mixed = any(c.islower() for c in name) and any(c.isupper() for c in name)
    return len(name) >= 24 and mixed and any(c.isdigit() for c in name)


def api_key_env_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as ``--api-key-env``, or None. The message never
    contains the value; a value that looks like a key is registered, so it is masked
    wherever else it might surface."""
    if not name or not name.strip():
        return ("--api-key-env is empty: give the NAME of the environment variable that "
                "holds the key, e.g. --api-key-env OPENAI_API_KEY")
    if looks_like_key(name):
        register(name)
        return ("--api-key-env takes the NAME of an environment variable, not the key: the "
                "value given looks like a key, so it was not used, shown or stored. Put the "
                "key in a variable (export MY_API_KEY=...) and pass --api-key-env MY_API_KEY")
    return None
