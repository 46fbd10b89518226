"""What a registration ships besides the code: the function's source lines.

cloudpickle sends functions defined in a script or notebook by value, and
their code objects arrive named ``<dynamic-code>``: a traceback on the
executor could then show where the error happened but not the line itself.
The client therefore ships the source it can find (``inspect.getsourcelines``)
with the code, and the executor files the code under the original file name
and puts those lines in :mod:`linecache`, so tracebacks read as they would
locally.
"""

from __future__ import annotations

import hashlib
import inspect
import linecache
import os
import threading
import types
from typing import Any

__all__ = ["Registration", "SourceSpan", "code_version", "install", "restore_lines", "source_of"]


def code_version(code: bytes) -> str:
    """A registration's version: a hash of its code (the scheduler's and executors')."""
    return hashlib.blake2b(code, digest_size=8).hexdigest()

#: Larger sources are not shipped (a registration travels in one message).
MAX_SOURCE = 256 * 1024
#: Line numbers past this are not filed (the cache holds every line up to the last).
MAX_LINE = 200_000
#: Source files an executor keeps lines for.
MAX_FILES = 1000


class SourceSpan:
    """Lines ``first_line``.. of ``filename``: where the registered code was written."""

    __slots__ = ("filename", "first_line", "lines")

    def __init__(self, filename: str, first_line: int, lines: list[str]) -> None:
        self.filename = filename
        self.first_line = first_line
        self.lines = lines

    def __reduce__(self) -> tuple[Any, ...]:
        return (SourceSpan, (self.filename, self.first_line, self.lines))


class Registration:
    """A registered function (or ``(cls, init_args)``) with its source, when known."""

    __slots__ = ("obj", "source")

    def __init__(self, obj: Any, source: SourceSpan | None) -> None:
        self.obj = obj
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        return (Registration, (self.obj, self.source))


def source_of(obj: Any) -> SourceSpan | None:
    """The source lines of a function or class, or None (built-ins, a REPL, ...)."""
    target = obj[0] if isinstance(obj, tuple) else obj
    target = inspect.unwrap(target) if callable(target) else target
    try:
        filename = inspect.getsourcefile(target) or inspect.getfile(target)
        lines, first = inspect.getsourcelines(target)
    except (OSError, TypeError):
        return None
    if sum(map(len, lines)) > MAX_SOURCE:
        return None
    return SourceSpan(filename, max(first, 1), list(lines))


# --------------------------------------------------------------------------- executor side

_lock = threading.Lock()
#: filename -> {line number: text}, merged from every registration shipped from it.
_known: dict[str, dict[int, str]] = {}


def install(registration: Any) -> Any:
    """The registered object, its code filed under its source file with the lines known.

    Anything but a :class:`Registration` (an older client) is returned as is.
    """
    if not isinstance(registration, Registration):
        return registration
    obj, span = registration.obj, registration.source
    if not (isinstance(span, SourceSpan) and isinstance(span.filename, str)
            and type(span.first_line) is int and span.first_line >= 1
            and isinstance(span.lines, list)
            and all(isinstance(line, str) for line in span.lines)
            and sum(map(len, span.lines)) <= MAX_SOURCE
            and span.first_line + len(span.lines) <= MAX_LINE):
        return obj  # no source, or not one we can use: tracebacks just lack the lines
    try:
        _file(obj, span)
    except Exception:  # odd code objects: the function still runs, without the lines
        pass
    return obj


def _file(obj: Any, span: SourceSpan) -> None:
    """File ``obj``'s code under ``span.filename`` and its lines in linecache."""
    target = obj[0] if isinstance(obj, tuple) else obj
    for function in _functions_of(target):
        function.__code__ = _refile(function.__code__, span.filename)
    if os.path.exists(span.filename):
        return  # the file is here (an embedded cluster): linecache reads it
    with _lock:
        if span.filename not in _known and len(_known) >= MAX_FILES:
            return  # bounded: past this many source files, tracebacks lack the lines
        known = _known.setdefault(span.filename, {})
        for offset, text in enumerate(span.lines):
            known[span.first_line + offset] = text
        _cache_lines(span.filename, known)


def _cache_lines(filename: str, known: dict[int, str]) -> None:
    last = max(known)
    lines = [known.get(n, "\n") for n in range(1, last + 1)]
    # mtime None: linecache.checkcache leaves the entry alone (no file to check).
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


def restore_lines(tb: types.TracebackType | None) -> None:
    """Put back the shipped lines of the files in ``tb`` that linecache has lost
    (user code, or anything else in the process, may clear it)."""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename not in linecache.cache:
            with _lock:
                known = _known.get(filename)
                if known:
                    _cache_lines(filename, known)
        tb = tb.tb_next


def _functions_of(target: Any) -> list[types.FunctionType]:
    """The functions whose code came with ``target``: itself, or a class's methods."""
    if isinstance(target, types.FunctionType):
        return [target]
    found = []
    if isinstance(target, type):
        for value in vars(target).values():
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if isinstance(value, types.FunctionType):
                found.append(value)
    return found


def _refile(code: types.CodeType, filename: str) -> types.CodeType:
    """``code`` (and the code nested in it) with ``co_filename`` set, if it was dynamic."""
    if code.co_filename != "<dynamic-code>":
        return code
    consts = tuple(_refile(c, filename) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)
