"""Logging helpers: make peer- and directory-supplied text safe to log."""

from __future__ import annotations

from axpolicy import limits


def printable(text: str | bytes, limit: int = limits.LOG_TEXT_CHARS) -> str:
    """Return *text* with non-printable characters escaped, cut to *limit* chars.

    Like Postfix's ``printable()`` with ``%.100s``: a log line can never be
    split or forged by what a client or the directory sends.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[: limit + 1])
    if len(out) > limit:
        out = out[:limit] + "..."
    return out
