"""How an exception reads in one line: for a log line, an error message or the page, never a traceback. stdlib only."""
from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-blank line of e's message, cut to `limit` characters; '' when it has none. (`str(e).splitlines()
    [0]` raised IndexError on an empty message and gave '' for one that starts with a newline.)"""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def message(e: BaseException, limit: int = 200) -> str:
    """The first line of e's message, or its type's name where the message is empty (a message for the page)."""
    return first_line(e, limit) or type(e).__name__


def brief(e: BaseException, limit: int = 200) -> str:
    """'Type: first line' of an exception, or just its type where the message is empty."""
    line = first_line(e, limit)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
