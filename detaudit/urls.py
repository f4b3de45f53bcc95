"""Base URLs: checked once, shown and stored without credentials.

A base URL may carry ``user:password@``; the HTTP client gets it whole, but
messages, the manifest and ``--resume`` only ever see it without. A URL that
cannot be sent to (no http/https scheme, no host, a port out of range, a broken
IPv6 literal) is refused before anything is created, with a message that does not
repeat its credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from detaudit.redact import redact, register


class BadBaseURL(ValueError):
    """The base URL cannot be used; the message says why, credentials masked."""


def check_base_url(url: str) -> str:
    """``url`` without its ``user:password@`` (which is registered as a secret);
    BadBaseURL when it is not an http(s) URL with a host and a valid port."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
        host = parts.hostname
    except ValueError as exc:
        raise BadBaseURL(_problem(url, f"it is not a valid URL ({exc})")) from None
    register(parts.password)
    if parts.username and parts.password is None:
        register(parts.username)  # https://TOKEN@host: the user name is the secret
    if parts.scheme not in ("http", "https"):
        raise BadBaseURL(_problem(url, "it must start with http:// or https://"))
    if not host:
        raise BadBaseURL(_problem(url, "it has no host name"))
    if port == 0:
        raise BadBaseURL(_problem(url, "port 0 is not a port a server listens on"))
    return without_userinfo(url)


def without_userinfo(url: str) -> str:
    """The URL with any ``user:password@`` left out (IPv6 brackets kept)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _problem(url: str, why: str) -> str:
    return (f"--base-url {redact(url)!r}: {why}; give the server's OpenAI-compatible base "
            "URL, e.g. http://127.0.0.1:8000/v1")
