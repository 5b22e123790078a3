"""Gitignore-style patterns: which workspace paths ``watch()`` and the manifests skip.

This module owns the matcher and nothing else.  It follows gitignore(5) and git's own
``wildmatch`` (with ``WM_PATHNAME``), byte for byte, because users will paste their
``.gitignore`` and expect git's answers (the tests compare with ``git ls-files`` and
``git check-ignore`` in a real repository):

- a blank line matches nothing; ``#`` starts a comment; ``\\#`` and ``\\!`` are literals;
  trailing spaces are dropped unless escaped (``\\ ``); a CR before the end is dropped;
- ``!`` negates (re-includes); the LAST matching pattern decides;
- a trailing ``/`` matches directories only; a ``/`` at the start or in the middle
  anchors the pattern at the root, otherwise it matches the name at any depth;
- ``*`` and ``?`` never match ``/``; ``[...]`` (``!``/``^`` negation, ranges, ``[:alpha:]``
  classes, ``\\`` escapes) never matches ``/``; ``**/`` (start or after ``/``) matches zero
  or more directories, ``/**`` at the end everything inside, other ``**`` are ``*``;
- an unclosed ``[`` or a malformed ``[:class:]`` makes the pattern match nothing;
- git's quirk is kept: an anchored pattern's literal prefix is compared first and only
  the rest is wildmatched, so a ``**`` right after that prefix counts as "at the start"
  (``d**/x`` ignores ``dx``);
- a path under an ignored directory is ignored, whatever later patterns say about it
  (git does not descend into an ignored directory, so it cannot re-include).

Paths are relative, ``/``-separated ``bytes`` (a workspace's internal form); matching is
byte-wise, as git's is.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["IgnoreRules", "Pattern", "parse_pattern"]

_CLASSES = {
    b"alnum": lambda c: chr(c).isalnum() and c < 128,
    b"alpha": lambda c: chr(c).isalpha() and c < 128,
    b"blank": lambda c: c in (0x20, 0x09),
    b"cntrl": lambda c: c < 0x20 or c == 0x7F,
    b"digit": lambda c: 0x30 <= c <= 0x39,
    b"graph": lambda c: 0x21 <= c <= 0x7E,
    b"lower": lambda c: 0x61 <= c <= 0x7A,
    b"print": lambda c: 0x20 <= c <= 0x7E,
    b"punct": lambda c: 0x21 <= c <= 0x7E and not chr(c).isalnum(),
    b"space": lambda c: c in (0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D),
    b"upper": lambda c: 0x41 <= c <= 0x5A,
    b"xdigit": lambda c: chr(c) in "0123456789abcdefABCDEF",
}
_SLASH = 0x2F
_NEVER = b"(?!)"


class _Malformed(Exception):
    """The pattern can never match (git's WM_ABORT_ALL)."""


@dataclass(frozen=True)
class Pattern:
    """One parsed line: ``negative`` (``!``), ``dir_only`` (trailing ``/``), ``anchored``
    (matched against the whole path rather than the last name), and its compiled regex."""

    source: bytes
    negative: bool
    dir_only: bool
    anchored: bool
    regex: "re.Pattern[bytes]"

    def matches(self, rel: bytes, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        subject = rel if self.anchored else rel.rpartition(b"/")[2]
        return self.regex.fullmatch(subject) is not None


def _trim_trailing_spaces(line: bytes) -> bytes:
    """git's trim_trailing_spaces: drop unescaped trailing spaces."""
    last_space = None
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == 0x20:
            if last_space is None:
                last_space = i
        elif c == 0x5C:  # backslash: the next byte is literal
            i += 1
            if i >= n:
                return line
            last_space = None
        else:
            last_space = None
        i += 1
    return line if last_space is None else line[:last_space]


def _pattern_bytes(line: str) -> bytes:
    """A str pattern as bytes; one no file name can match (a lone surrogate outside the
    surrogate escapes) is a ValueError naming it, not a bare UnicodeEncodeError."""
    try:
        return os.fsencode(line)
    except UnicodeEncodeError as e:
        raise ValueError(f"the ignore pattern {line!r} is not valid file-name text "
                         f"({e.reason} at character {e.start})") from None


def parse_pattern(line: str | bytes) -> Pattern | None:
    """Parse one gitignore line; None for a blank line or a comment."""
    raw = _pattern_bytes(line) if isinstance(line, str) else bytes(line)
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    if not raw or raw.startswith(b"#"):
        return None
    body = _trim_trailing_spaces(raw)
    if not body:
        return None
    negative = body.startswith(b"!")
    if negative:
        body = body[1:]
    dir_only = body.endswith(b"/")
    if dir_only:
        body = body[:-1]
    anchored = b"/" in body
    if body.startswith(b"/"):
        body = body[1:]
    # git compares an anchored pattern's literal prefix (up to the first of ``*?[\``)
    # first and wildmatches only the rest, so a ``**`` right after that prefix counts as
    # "at the start" (``d**/x`` matches ``dx``): do the same
    cut = len(body)
    if anchored:
        for i, c in enumerate(body):
            if c in b"*?[\\":
                cut = i
                break
    try:
        rx = re.escape(body[:cut]) + _translate(body[cut:]) if anchored else _translate(body)
    except _Malformed:
        rx = _NEVER
    return Pattern(raw, negative, dir_only, anchored, re.compile(rx, re.DOTALL))


def _translate(p: bytes) -> bytes:
    """git wildmatch (WM_PATHNAME) as a bytes regex matched with ``fullmatch``."""
    out: list[bytes] = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == 0x2A:  # '*'
            j = i
            while j < n and p[j] == 0x2A:
                j += 1
            double = j - i >= 2
            at_start = i == 0 or p[i - 1] == _SLASH
            next_is_slash = j < n and (p[j] == _SLASH or (p[j] == 0x5C and j + 1 < n
                                                          and p[j + 1] == _SLASH))
            if double and at_start and (j == n or next_is_slash):
                if j == n:
                    out.append(b".*")
                    i = j
                else:  # '**/': zero or more directories
                    out.append(b"(?:.*/)?")
                    i = j + (2 if p[j] == 0x5C else 1)
                continue
            out.append(b"[^/]*")
            i = j
        elif c == 0x3F:  # '?'
            out.append(b"[^/]")
            i += 1
        elif c == 0x5B:  # '['
            members, i = _bracket(p, i)
            members.discard(_SLASH)
            out.append(_byte_class(members))
        elif c == 0x5C:  # backslash: the next byte literally
            if i + 1 >= n:
                raise _Malformed  # a trailing backslash never matches
            out.append(re.escape(p[i + 1:i + 2]))
            i += 2
        else:
            out.append(re.escape(p[i:i + 1]))
            i += 1
    return b"".join(out)


def _bracket(p: bytes, i: int) -> tuple[set[int], int]:
    """Parse ``[...]`` starting at p[i] == '['; (matching bytes, index after ']')."""
    n = len(p)
    i += 1
    if i >= n:
        raise _Malformed
    negated = p[i] in (0x21, 0x5E)  # '!' or '^'
    if negated:
        i += 1
    matched: set[int] = set()
    prev: int | None = None
    first = True
    while True:
        if i >= n:
            raise _Malformed
        c = p[i]
        if c == 0x5D and not first:  # ']'
            break
        first = False
        if c == 0x5C:  # escaped byte
            i += 1
            if i >= n:
                raise _Malformed
            c = p[i]
            matched.add(c)
            prev = c
        elif c == 0x2D and prev is not None and i + 1 < n and p[i + 1] != 0x5D:  # range
            i += 1
            hi = p[i]
            if hi == 0x5C:
                i += 1
                if i >= n:
                    raise _Malformed
                hi = p[i]
            matched.update(range(prev, hi + 1))
            prev = None
        elif c == 0x5B and i + 1 < n and p[i + 1] == 0x3A:  # '[:'
            j = i + 2
            while j < n and p[j] != 0x5D:
                j += 1
            if j >= n:
                raise _Malformed
            name = p[i + 2:j]
            if len(name) < 1 or not name.endswith(b":"):
                # not a class: a literal '[' and go on after it
                matched.add(0x5B)
                prev = 0x5B
            else:
                test = _CLASSES.get(name[:-1])
                if test is None:
                    raise _Malformed
                matched.update(b for b in range(256) if test(b))
                prev = None
                i = j
        else:
            matched.add(c)
            prev = c
        i += 1
    if negated:
        matched = set(range(256)) - matched
    return matched, i + 1


def _byte_class(members: set[int]) -> bytes:
    if not members:
        return _NEVER
    parts, run = [], sorted(members)
    start = prev = run[0]
    for b in run[1:] + [None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        lo, hi = re.escape(bytes([start])), re.escape(bytes([prev]))
        parts.append(lo if start == prev else lo + b"-" + hi)
        if b is not None:
            start = prev = b
    return b"[" + b"".join(parts) + b"]"


class IgnoreRules:
    """An ordered list of gitignore patterns (``ignore=`` of a workspace)."""

    def __init__(self, patterns: Iterable[str | bytes] | str | bytes | None = None) -> None:
        if patterns is None:
            lines: list = []
        elif isinstance(patterns, (str, bytes)):
            lines = (patterns.split(b"\n") if isinstance(patterns, bytes)
                     else patterns.split("\n"))
        else:
            try:
                lines = list(patterns)
            except TypeError:  # (a bare "'int' object is not iterable" named nothing)
                raise TypeError(f"ignore= takes gitignore patterns (a str, bytes or an "
                                f"iterable of them), not {type(patterns).__name__}"
                                ) from None
            for line in lines:
                if not isinstance(line, (str, bytes)):
                    raise TypeError(f"an ignore pattern is a str or bytes, not "
                                    f"{type(line).__name__}: {line!r}")
        self.sources = [_pattern_bytes(x) if isinstance(x, str) else bytes(x) for x in lines]
        self.patterns = [p for p in (parse_pattern(x) for x in self.sources) if p is not None]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"IgnoreRules({[p.source for p in self.patterns]!r})"

    def decide(self, rel: bytes, is_dir: bool) -> bool | None:
        """What the last pattern matching ``rel`` itself says: True ignore, False
        re-include, None no pattern matches (parents are not looked at)."""
        for pat in reversed(self.patterns):
            if pat.matches(rel, is_dir):
                return not pat.negative
        return None

    def ignored_here(self, rel: bytes, is_dir: bool) -> bool:
        """Is ``rel`` ignored, given that its parent directories are not?  (What a walk
        that does not descend into ignored directories asks.)"""
        return bool(self.patterns) and self.decide(rel, is_dir) is True

    def ignored(self, rel: bytes, is_dir: bool) -> bool:
        """Is ``rel`` ignored: itself, or because a parent directory is."""
        if not self.patterns:
            return False
        parts = rel.split(b"/")
        for k in range(1, len(parts)):
            if self.decide(b"/".join(parts[:k]), True) is True:
                return True
        return self.decide(rel, is_dir) is True
