"""The Rego input document, handed to rego-cpp in one pass.

rego-cpp's C input API stores strings verbatim and compares them with the *escaped* text of
Rego literals, and it truncates at NUL (a policy bypass: ``"admin\\x00x" == "admin"``), so
every string (keys too) crosses JSON-escaped. regopy's ``Input(value)`` walks the value through
per-call wrappers that each allocate a buffer; on the input of a typical call that walk cost
~130 µs, half the decision. This walk escapes and pushes in one pass through the same C
functions (``regopy.rego_shared.rego``, the library regopy itself loads), ~2x cheaper; the
result is a regopy ``Input`` and is freed the same way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from regopy import Input, RegoError
from regopy.rego_shared import rego as _lib

_INT64 = (-(1 << 63), (1 << 63) - 1)
_OK = 0
_json_text = json.JSONEncoder(ensure_ascii=False, allow_nan=False, check_circular=True).encode
# What json.dumps(ensure_ascii=False) escapes: quote, backslash, C0 controls.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')
# Object keys repeat on every call (agent, request, method ...): their bytes are kept.
_KEY_CACHE: dict[str, bytes] = {}
_KEY_CACHE_MAX = 4096

_new, _free = _lib.regoNewInput, _lib.regoFreeInput
_str, _int, _float, _bool, _null = (_lib.regoInputString, _lib.regoInputInt, _lib.regoInputFloat,
                                    _lib.regoInputBoolean, _lib.regoInputNull)
_item, _object, _array = _lib.regoInputObjectItem, _lib.regoInputObject, _lib.regoInputArray


class NeedsJsonTerm(Exception):
    """An integer beyond int64: the C input API cannot carry it, the JSON term parser can."""


def escaped(text: str) -> bytes:
    """``text`` in JSON-escaped form (without quotes), UTF-8."""
    if _NEEDS_ESCAPE.search(text) is None:
        return text.encode()
    return _json_text(text)[1:-1].encode()


def _key(key: Any) -> bytes:
    out = _KEY_CACHE.get(key)
    if out is None:
        if not isinstance(key, str):
            raise TypeError(f"input object key {key!r} is not a string")
        out = escaped(key)
        if len(_KEY_CACHE) < _KEY_CACHE_MAX and len(key) <= 64:
            _KEY_CACHE[key] = out
    return out


class _Built(Input):
    """A regopy ``Input`` whose C object was pushed by :func:`build_input`."""

    def __init__(self, impl: Any) -> None:  # noqa: D107 - Input.__init__ would walk the value again
        self._impl = impl


def build_input(value: Any) -> Input:
    """``value`` (JSON-like) as a regopy ``Input`` with every string JSON-escaped.

    Raises :class:`NeedsJsonTerm` for integers beyond int64, ``TypeError``/``ValueError``
    for values that are not JSON, ``UnicodeError`` for lone surrogates.
    """
    p = _new()

    def check(code: int) -> None:
        if code != _OK:
            raise RegoError("unable to create input", code)

    def add(v: Any) -> None:
        if isinstance(v, str):
            check(_str(p, escaped(v)))
        elif v is None:
            check(_null(p))
        elif v is True or v is False:
            check(_bool(p, v))
        elif isinstance(v, int):
            if not _INT64[0] <= v <= _INT64[1]:
                raise NeedsJsonTerm
            check(_int(p, v))
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"input contains a non-finite number ({v})")
            check(_float(p, v))
        elif isinstance(v, dict):
            for key, item in v.items():
                check(_str(p, _key(key)))
                add(item)
                check(_item(p))
            check(_object(p, len(v)))
        elif isinstance(v, (list, tuple)):
            for item in v:
                add(item)
            check(_array(p, len(v)))
        else:
            raise TypeError(f"input contains a {type(v).__name__}, which is not JSON")

    try:
        add(value)
    except BaseException:
        _free(p)
        raise
    return _Built(p)


def json_term(value: Any) -> str:
    """``value`` as a JSON term, for rego-cpp's parser (the path for huge integers)."""
    return _json_text(value)
