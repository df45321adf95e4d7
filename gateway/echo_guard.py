"""Keep a route's injected credential from coming back to the agent in the response.

On a route with a ``credential`` the gateway injects it so that agents never hold it. An
upstream that reflects its request (an echo or debug endpoint, an error page quoting the
headers, TRACE) would still hand it to the agent, who could then call the upstream without the
gateway. So on such routes the gateway asks for an uncoded answer (``Accept-Encoding:
identity``) and replaces the credential, in the forms an echo takes (as sent, with JSON's
escaped slashes, percent-encoded, a Basic credential's password), with
``[REDACTED:credential]`` in every response header and in the body, whole or streamed.

An upstream may content-code its answer all the same: such a body read whole is decoded to be
checked, and refused if the credential is in it (it cannot be replaced inside the coding); a
content-coded stream cannot be checked as it passes and is refused. Values shorter than
``MIN_SECRET_BYTES`` are not searched for (they would match ordinary text); the gateway warns
at start-up about such a credential.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import quote

from multidict import CIMultiDict

from gateway.errors import GatewayError
from gateway.redaction.codec import decode, parse_encodings
from gateway.redaction.settings import NotRedactable

REPLACEMENT = b"[REDACTED:credential]"
KIND = "credential_echo"
MIN_SECRET_BYTES = 8
# "<auth-scheme> <credentials>" (RFC 9110 §11.4): the credentials part is the secret.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)[ \t]+(\S.*)")


def secret_forms(header_value: str, secret: str | None = None) -> list[str]:
    """The strings whose presence in a response gives the credential away: for the header value
    sent and for the bare ``secret`` in it (the value without the route's configured prefix)."""
    value = header_value.strip()
    m = _SCHEME.fullmatch(value)
    tokens = {m.group(2).strip() if m else value}
    if secret and secret.strip():
        tokens.add(secret.strip())
    forms: set[str] = set()
    for token in tokens:
        forms.update({token, token.replace("/", "\\/"), quote(token, safe="")})
    if m and m.group(1).lower() == "basic":
        try:
            user_pass = base64.b64decode(m.group(2).strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            user_pass = ""
        if ":" in user_pass:
            forms.update({user_pass, user_pass.partition(":")[2]})
    return sorted((f for f in forms if len(f.encode()) >= MIN_SECRET_BYTES), key=len, reverse=True)


def _refused(reasons: list[str], why: str, code: str) -> GatewayError:
    reasons.append(why)
    return GatewayError(f"{why}; refused (the route's credential must not reach the agent)",
                        code=code, status=502, outcome="redaction_failed")


class EchoGuard:
    """The search for one route's credential: header values, whole bodies, streams."""

    def __init__(self, header_value: str, *, secret: str | None = None, decode_limit: int) -> None:
        needles = [f.encode() for f in secret_forms(header_value, secret)]
        self.active = bool(needles)
        self.decode_limit = decode_limit
        self._re = re.compile(b"|".join(re.escape(n) for n in needles)) if needles else None
        self._text = re.compile("|".join(re.escape(n.decode()) for n in needles)) if needles else None
        self._needles = needles
        self._starts = frozenset(n[0] for n in needles)
        self._longest = max(map(len, needles), default=0)

    def bytes(self, data: bytes) -> tuple[bytes, int]:
        """``data`` with every occurrence replaced, and how many there were."""
        if self._re is None or not data:
            return data, 0
        return self._re.subn(REPLACEMENT, data)

    def headers(self, headers: "CIMultiDict[str] | dict[str, str]") -> int:
        """Replace the credential in ``headers``' values in place; how many were replaced."""
        if self._text is None:
            return 0
        items, found = [], 0
        for key, value in headers.items():
            new, n = self._text.subn(REPLACEMENT.decode(), value)
            items.append((key, new))
            found += n
        if found:  # rebuilt in order, every value of a repeated header included
            headers.clear()
            if isinstance(headers, CIMultiDict):
                headers.extend(items)
            else:
                headers.update(items)
        return found

    def whole(self, body: bytes, content_encoding: str | None, reasons: list[str]) -> tuple[bytes, int]:
        """A body read whole: replaced when uncoded; decoded and checked when coded.

        Raises GatewayError ``credential_echoed`` when a coded body contains the credential,
        ``response_not_checkable`` when it cannot be decoded to be checked."""
        try:
            codings = parse_encodings(content_encoding)
            if not codings:
                return self.bytes(body)
            plain, _ = decode(body, codings, self.decode_limit)
        except NotRedactable as exc:
            raise _refused(reasons, f"a {content_encoding}-coded response body cannot be checked for the "
                                    f"route credential ({exc.reason})", "response_not_checkable") from None
        if self._re is not None and self._re.search(plain):
            raise _refused(reasons, f"the upstream echoed the route credential inside a {content_encoding}-coded "
                                    "body", "credential_echoed")
        return body, 0

    def check_stream(self, content_encoding: str | None, reasons: list[str]) -> None:
        """Refuse a content-coded stream: it cannot be checked as it passes."""
        try:
            codings = parse_encodings(content_encoding)
        except NotRedactable:
            codings = [content_encoding or ""]
        if codings:
            raise _refused(reasons, f"a {content_encoding}-coded response stream cannot be checked for the "
                                    "route credential", "response_not_checkable")

    def stream(self) -> "EchoScanner":
        return EchoScanner(self)

    def _held(self, buf: bytes) -> int:
        """How many bytes at the end of ``buf`` could begin a credential (kept for the next chunk)."""
        for k in range(min(self._longest - 1, len(buf)), 0, -1):
            if buf[-k] in self._starts and any(n.startswith(buf[-k:]) for n in self._needles):
                return k
        return 0


class EchoScanner:
    """A streamed body: each chunk passes with the credential replaced, less the few bytes at
    its end that could begin one (so an event stream is not held up: those are rarely any)."""

    def __init__(self, guard: EchoGuard) -> None:
        self._guard = guard
        self._tail = b""
        self.count = 0

    def feed(self, chunk: bytes) -> bytes:
        buf, n = self._guard.bytes(self._tail + chunk)
        self.count += n
        keep = self._guard._held(buf)
        if keep:
            self._tail = buf[-keep:]
            return buf[:-keep]
        self._tail = b""
        return buf

    def close(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail
