"""JSON Lines text, free of Beam: how an input file is cut into lines (one rule for the pipeline
and for `simulate`), and how an output line is written (`to_json_line`).

Lines are bytes, never decoded here: a line that is not UTF-8 reaches the parse stage as it is
and becomes a dead letter with its bytes kept (base64), instead of failing the whole file.

- A line ends at `\\n`; a `\\r` just before it is part of the separator (`\\r\\n`). A bare `\\r`
  is not a separator (JSON Lines, like Beam's ReadFromText, knows only `\\n` and `\\r\\n`): it stays
  in the line, where JSON reads it as white space between tokens.
- A UTF-8 byte order mark at the very start of a file is dropped (editors on Windows write one;
  JSON parsers refuse it). Anywhere else it is content.
- The last line needs no `\\n`.
- A blank line (nothing but JSON white space: space, tab, `\\r`) is no event: it is skipped and
  counted (`blank_lines`), not a dead letter.
- Escapes such as `"\\ud800"` (a lone surrogate) are JSON's business: they parse, and the output
  writers escape what UTF-8 cannot encode (`to_json_line`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any, Protocol

import orjson

BOM = b"\xef\xbb\xbf"
_WHITE_SPACE = b" \t\r\n"


class Readable(Protocol):
    """What a line source needs: a binary file, stdin's buffer, or a Beam filesystem handle."""

    def readline(self) -> bytes: ...


def split_lines(handle: Readable) -> Iterator[bytes]:
    """The lines of a binary file, without their separators, blank ones included (module
    docstring)."""
    first = True
    for raw in iter(handle.readline, b""):
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if line.endswith(b"\r") and raw.endswith(b"\n"):
            line = line[:-1]
        if first:
            first = False
            line = line.removeprefix(BOM)
        yield line


def is_blank(line: bytes) -> bool:
    """True for a line that holds no event (only JSON white space)."""
    return not line.strip(_WHITE_SPACE)


def event_lines(handle: Readable) -> Iterator[bytes]:
    """The lines that can hold an event: `split_lines` without the blank ones (for readers that
    skip them without counting, like `simulate`)."""
    return (line for line in split_lines(handle) if not is_blank(line))


def to_json_line(value: Any, *, finite: bool = False) -> str:
    """Compact, one line, non-ASCII text as it is; but escaped when the value holds a lone
    surrogate (JSON input may contain `"\\ud800"`), which UTF-8 cannot encode.

    orjson writes it first, about five times faster than `json.dumps` and as the same JSON value,
    except for an infinite or NaN number (`json.dumps` writes `Infinity`, `NaN`; orjson `null`:
    an event may hold one, `1e999` parses as infinity). So its line is kept only when it has no
    `null` at all, or when the caller knows the value is `finite`; what orjson refuses (lone
    surrogates, integers over 64 bits, keys that are not strings) goes the slow way too."""
    try:
        fast = orjson.dumps(value)
    except TypeError:
        pass
    else:
        if finite or b"null" not in fast:
            return fast.decode()
    return standard_json_line(value)


def standard_json_line(value: Any) -> str:
    """`to_json_line` by the standard library alone (its general path)."""
    line = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))
    return line


def finite_and_static(config: Any) -> bool:
    """No infinite or NaN number and no callable anywhere in a config value: then nothing
    planned with it from an event orjson decoded (it refuses `NaN`, `Infinity` and `1e999`)
    holds a non-finite number, and the output may be written with `finite=True`."""
    if isinstance(config, dict):
        return all(finite_and_static(item) for item in config.values())
    if isinstance(config, list):
        return all(finite_and_static(item) for item in config)
    if isinstance(config, float):
        return math.isfinite(config)
    return not callable(config)
