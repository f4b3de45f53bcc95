"""Base URLs: checked once, shown and stored without credentials.

A base URL may carry ``user:password@``; the HTTP client gets it whole, but
messages, the manifest and ``--resume`` only ever see it without. A URL that
cannot be sent to (no http/https scheme, no host, a port out of range, a broken
IPv6 literal) is refused before anything is created, with a message that does not
repeat its credentials.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from detaudit.redact import redact, register


class BadBaseURL(ValueError):
    """The base URL cannot be used; the message says why, credentials masked."""


def check_base_url(url: str) -> str:
    """``url`` without its ``user:password@`` (which is registered as a secret);
    BadBaseURL naming the part that is wrong (scheme, host, port, IPv6 brackets)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        if str(exc) == "Invalid IPv6 URL":  # urlsplit: a "[" without its "]"
            raise BadBaseURL(_problem(url, "the IPv6 address is not closed by ']' (write it as "
                                           "http://[::1]:8000/v1)")) from None
        raise BadBaseURL(_problem(url, f"the host is not a valid address ({exc})")) from None
    register(parts.password)
    if parts.username and parts.password is None:
        register(parts.username)  # https://TOKEN@host: the user name is the secret
    try:
        host = parts.hostname
    except ValueError as exc:
        raise BadBaseURL(_problem(url, f"the host is not a valid address ({exc})")) from None
    if parts.scheme not in ("http", "https"):
        raise BadBaseURL(_problem(url, f"the scheme must be http or https, not {parts.scheme or 'missing'!r}"))
    if not host:
        raise BadBaseURL(_problem(url, "it names no host"))
    try:
        port = parts.port  # raises for a port out of range or not a number
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        text = parts.netloc.rsplit("]", 1)[-1].rsplit(":", 1)[-1]
        raise BadBaseURL(_problem(url, f"the port {text!r} is not a number from 1 to 65535"))
    return without_userinfo(url)


def without_userinfo(url: str) -> str:
    """The URL with any ``user:password@`` left out (IPv6 brackets kept)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _problem(url: str, why: str, example: bool = True) -> str:
    hint = "; give the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1" if example else ""
    return f"--base-url {redact(without_userinfo_loose(url))!r}: {why}{hint}"


def without_userinfo_loose(url: str) -> str:
    """Like without_userinfo, for text that may not even parse as a URL."""
    return re.sub(r"//[^/@]*@", "//", url)
