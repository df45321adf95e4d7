"""TEST FIXTURE, not a ClickHouse server: a loopback HTTP server that speaks enough of
ClickHouse's HTTP interface for ``clickhouse-connect`` to work unchanged, executing every
statement in chDB (embedded ClickHouse) on one data directory.

It exists because no ClickHouse server can be installed on the test machines, and some tests
need what only a server gives: several gateway processes sharing one store (chDB allows one
process per data path) and a store that goes down and comes back (outage/replay tests).
chDB is process-global, so the server runs as its own process::

    python -m tests.clickhouse_fixture --data DIR --port 0
    # -> clickhouse-fixture listening on 127.0.0.1:PORT

and tests drive it with :class:`ClickHouseFixture` (start / stop / kill / restart).

What is implemented (everything else is out of scope for a test fixture):

* ``GET /ping`` (and ``GET /`` without a query, ``/replicas_status``) -> ``Ok.\\n``.
* Queries from the ``query`` URL parameter and/or the POST body (joined by a newline, as
  ClickHouse does), or from ``multipart/form-data`` fields (``query``, ``param_*``; external
  data files are refused). Request bodies may be ``Content-Encoding`` gzip, deflate, br, zstd
  or lz4 (lz4 frame) and may use chunked transfer encoding.
* ``INSERT ... FORMAT <fmt>`` followed by data: streamed into chDB with ``send_insert``.
* URL parameters that are not HTTP-interface parameters are settings, applied to that request
  only (``readonly`` last, so the other settings are checked before it takes effect, as
  ClickHouse does); GET requests run with ``readonly=2`` unless ``readonly`` is set.
  Bound parameters ``param_*``; ``database``; ``default_format``; ``query_id``.
* Sessions (``session_id``, ``session_timeout``, ``session_check``, ``close_session``):
  ``USE`` and ``SET`` persist in a session. Temporary tables do not survive between requests.
* Basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers or ``user``/``password``
  parameters, checked against one user (``default``, password from
  ``$CLICKHOUSE_FIXTURE_PASSWORD``, empty by default).
* Errors as ClickHouse sends them: the status from ClickHouse's ``exceptionCodeToHTTPStatus``,
  body ``Code: N. DB::Exception: ... (NAME) (version V)`` and ``X-ClickHouse-Exception-Code``.
* Response headers ``X-ClickHouse-Summary``, ``-Query-Id``, ``-Timezone``, ``-Format`` (for
  statements that produce a result), ``-Server-Display-Name``. Responses are never compressed
  (the client accepts that) and ``client_protocol_version`` is ignored (clickhouse-connect
  probes it and falls back to protocol 0). ``compress=1``/``decompress=1`` (ClickHouse's own
  block compression) and multi-statement queries are refused like a server would.

Requests run one at a time (one lock around chDB). Each request runs on a chDB connection
configured with exactly its session state and settings; configured connections are reused
for identical requests, and any connection whose state the statement may have changed (``SET``,
``USE``, temporary tables) or that saw an error is closed, never reused.
"""

from __future__ import annotations

import argparse
import base64
import collections
import email.parser
import email.policy
import gzip
import hmac
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, quote, urlsplit

log = logging.getLogger("clickhouse_fixture")

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "clickhouse-fixture listening on"
PASSWORD_ENV = "CLICKHOUSE_FIXTURE_PASSWORD"
EXIT_PORT_IN_USE = 3

# URL parameters the HTTP interface consumes itself; everything else (except param_*) is a setting.
HTTP_PARAMS = frozenset({
    "query", "database", "default_format", "user", "password", "quota_key", "session_id",
    "session_timeout", "session_check", "close_session", "query_id", "compress", "decompress",
    "buffer_size", "wait_end_of_query", "role", "client_protocol_version", "stacktrace",
})
RESULT_KEYWORDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS", "CHECK"})
DEFAULT_SESSION_TIMEOUT = 60.0
MAX_SESSION_TIMEOUT = 3600.0
POOL_SIZE = 16
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE = re.compile(r"Code:\s*(\d+)")
_IDENT_CHARS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp), by name.
_STATUS_BY_NAME: dict[str, int] = {"REQUIRED_PASSWORD": 401}
_STATUS_BY_NAME.update(dict.fromkeys(
    ("UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE"), 403))
_STATUS_BY_NAME.update(dict.fromkeys((
    "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
    "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
    "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
    "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
    "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST",
    "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
    "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"), 400))
_STATUS_BY_NAME.update(dict.fromkeys((
    "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
    "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING", "UNKNOWN_AGGREGATE_FUNCTION",
    "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"), 404))
_STATUS_BY_NAME.update({
    "QUERY_IS_TOO_LARGE": 413, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503, "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411, "TIMEOUT_EXCEEDED": 408, "CANNOT_SCHEDULE_TASK": 503,
})
# Codes the fixture raises itself (stable ClickHouse error codes).
SYNTAX_ERROR, UNKNOWN_SETTING, NOT_IMPLEMENTED, UNKNOWN_EXCEPTION = 62, 115, 48, 1002
SESSION_NOT_FOUND, INVALID_SESSION_TIMEOUT, AUTHENTICATION_FAILED = 372, 374, 516


class ChError(Exception):
    """A ClickHouse-style error: ``code`` and the ``Code: N. DB::Exception: ...`` text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def make(cls, code: int, name: str, text: str) -> "ChError":
        return cls(code, f"Code: {code}. DB::Exception: {text}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> "ChError":
        text = str(exc).strip()
        idx = text.find("Code: ")
        if idx >= 0:
            text = text[idx:]
            m = _CODE.match(text)
            return cls(int(m.group(1)) if m else UNKNOWN_EXCEPTION, text)
        return cls.make(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", text or type(exc).__name__)


# ---------------------------------------------------------------------------- SQL scanning
@dataclass
class Statement:
    """What the fixture needs to know about one statement (no real parsing)."""

    first: str = ""
    """First keyword, upper-cased (``SELECT``, ``INSERT``, ``SET`` ...)."""
    output_format: str | None = None
    """The statement's own top-level ``FORMAT`` (non-INSERT statements)."""
    insert_header: str | None = None
    """For ``INSERT ... FORMAT fmt <data>``: the statement before ``FORMAT``."""
    insert_format: str = ""
    data_start: int = 0
    temporary: bool = False
    text_end: int = 0
    """End of the statement text (before a trailing ';'), for non-INSERT-with-data statements."""


def _skip_quoted(s: str, i: int) -> int:
    quote_char, n, j = s[i], len(s), i + 1
    while j < n:
        if s[j] == "\\":
            j += 2
        elif s[j] == quote_char:
            if j + 1 < n and s[j + 1] == quote_char:
                j += 2
            else:
                return j + 1
        else:
            j += 1
    return n


def _skip_block_comment(s: str, i: int) -> int:
    depth, j, n = 1, i + 2, len(s)
    while j < n and depth:
        if s.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif s.startswith("*/", j):
            depth, j = depth - 1, j + 2
        else:
            j += 1
    return j


def scan_statement(raw: bytes) -> Statement:
    """Find the first keyword, the FORMAT clause and where INSERT data starts.

    Raises ChError for an empty query or several statements (the HTTP interface runs one).
    Works on the bytes decoded as latin-1 so offsets are byte offsets; stops at INSERT data.
    """
    s = raw.decode("latin-1")
    st = Statement()
    i, n, depth = 0, len(s), 0
    semicolon: int | None = None
    inline_data = False
    last_end = 0
    while i < n:
        ch = s[i]
        if ch.isspace():
            i += 1
            continue
        if s.startswith("--", i) or s.startswith("# ", i) or s.startswith("#!", i):
            j = s.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if s.startswith("/*", i):
            i = _skip_block_comment(s, i)
            continue
        if semicolon is not None:
            raise ChError.make(SYNTAX_ERROR, "SYNTAX_ERROR", "Multi-statements are not allowed")
        m = _IDENT_CHARS.match(s, i)
        if ch in "'\"`":
            i = _skip_quoted(s, i)
        elif ch == "$" and (h := re.match(r"\$([A-Za-z0-9_]*)\$", s[i:i + 64])):
            end = s.find(h.group(0), i + len(h.group(0)))
            i = n if end < 0 else end + len(h.group(0))
        elif m:
            word = m.group(0).upper()
            if not st.first:
                st.first = word
            if depth == 0 and word == "TEMPORARY":
                st.temporary = True
            if depth == 0 and st.first == "INSERT" and word in ("SELECT", "WITH", "VALUES"):
                inline_data = True  # INSERT ... SELECT/VALUES: chDB runs the whole text
            i = m.end()
            if depth == 0 and word == "FORMAT" and not inline_data:
                j = i
                while j < n and s[j] in " \t\r\n\f":
                    j += 1
                name = _IDENT_CHARS.match(s, j)
                if name and j > i:
                    if st.first == "INSERT":
                        st.insert_header = raw[:m.start()].decode("utf-8").rstrip()
                        st.insert_format = name.group(0)
                        k = name.end()
                        while k < n and s[k] in " \t\f":
                            k += 1
                        if k < n and s[k] == "\r":
                            k += 1
                        if k < n and s[k] == "\n":
                            k += 1
                        st.data_start = k
                        return st
                    st.output_format = name.group(0)
                    i = name.end()
        elif ch == "(":
            depth += 1
            i += 1
        elif ch == ")":
            depth -= 1
            i += 1
        elif ch == ";" and depth <= 0:
            semicolon = i
            i += 1
            continue
        else:
            i += 1
        last_end = i
    if not st.first:
        raise ChError.make(SYNTAX_ERROR, "SYNTAX_ERROR", "Empty query")
    st.text_end = last_end
    return st


# ---------------------------------------------------------------------------- request bodies
def decode_body(data: bytes, encoding: str) -> bytes:
    """Undo a request ``Content-Encoding`` the way ClickHouse does (lz4 is the LZ4 frame format)."""
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity", "none"):
            return data
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(data)
        if encoding == "deflate":
            return zlib.decompress(data)
        if encoding == "br":
            import brotli  # type: ignore[import-not-found,unused-ignore]
            return brotli.decompress(data)
        if encoding == "zstd":
            try:
                from backports import zstd  # type: ignore[import-not-found,unused-ignore]
                return zstd.decompress(data)
            except ImportError:
                import zstandard  # type: ignore[import-not-found,unused-ignore]
                return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        if encoding == "lz4":
            import lz4.frame  # type: ignore[import-not-found,unused-ignore]
            return lz4.frame.decompress(data)
    except ChError:
        raise
    except Exception as exc:
        raise ChError.make(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION",
                           f"cannot decode request body ({encoding}): {exc}") from None
    raise ChError.make(NOT_IMPLEMENTED, "NOT_IMPLEMENTED", f"Unknown HTTP compression method '{encoding}'")


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """Form fields of a multipart/form-data body; file parts (external data) are refused."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    fields: list[tuple[str, str]] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            raise ChError.make(NOT_IMPLEMENTED, "NOT_IMPLEMENTED",
                               "external data is not supported by the clickhouse fixture")
        payload = part.get_payload(decode=True) or b""
        if isinstance(name, str):
            fields.append((name, payload.decode("utf-8")))
    return fields


@dataclass
class Request:
    method: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    """Lower-cased header names."""
    body: bytes


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- engine
@dataclass
class Session:
    database: str | None = None
    sets: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_SESSION_TIMEOUT
    expires: float = 0.0


def _quote_literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quote_ident(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _content_type(fmt: str) -> str:
    f = fmt.lower()
    if f.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if f.startswith("csv"):
        return "text/csv; charset=UTF-8; header=absent"
    if f.startswith("json"):
        return "application/json; charset=UTF-8"
    if f in ("pretty", "prettycompact", "vertical", "markdown", "values"):
        return "text/plain; charset=UTF-8"
    return "application/octet-stream"


class Engine:
    """chDB on one data path, used by one request at a time."""

    def __init__(self, data_dir: Path, *, user: str = "default", password: str = "") -> None:
        import chdb

        self._chdb = chdb
        self.path = str(Path(data_dir).resolve())
        Path(self.path).mkdir(parents=True, exist_ok=True)
        self.user = user
        self._password = password
        self.lock = threading.Lock()
        # Keeps the engine up between requests: closing the last handle shuts chDB down.
        self._anchor = self._connect()
        row = self._anchor.query("SELECT version(), timezone()", "TabSeparated").bytes().decode().split("\t")
        self.version, self.timezone = row[0].strip(), row[1].strip()
        names = ", ".join(_quote_literal(n) for n in _STATUS_BY_NAME)
        res = self._anchor.query(
            f"SELECT number, errorCodeToName(number) FROM numbers(2000) WHERE errorCodeToName(number) IN ({names})",
            "TabSeparated").bytes().decode()
        self._status_by_code = {int(c): _STATUS_BY_NAME[nm] for c, nm in
                                (line.split("\t") for line in res.splitlines() if line)}
        self._pool: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
        self._sessions: dict[str, Session] = {}
        self._closed = False

    def _connect(self) -> Any:
        return self._chdb.connect(f"file:{self.path}")

    def close(self) -> None:
        with self.lock:
            self._closed = True
            for conn in self._pool.values():
                conn.close()
            self._pool.clear()
            self._anchor.close()

    # -- HTTP-level pieces
    def http_status(self, code: int) -> int:
        return self._status_by_code.get(code, 500)

    def error_reply(self, err: ChError, query_id: str = "") -> Reply:
        text = err.message.rstrip()
        if "(version " not in text:
            text += f" (version {self.version})"
        return Reply(self.http_status(err.code), (text + "\n").encode(), {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(err.code),
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self.timezone,
        })

    def authenticate(self, req: Request, params: dict[str, str]) -> None:
        user, password = req.headers.get("x-clickhouse-user"), req.headers.get("x-clickhouse-key")
        auth = req.headers.get("authorization", "")
        if user is None and auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "basic":
                raise ChError.make(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                                   "Authentication failed: only Basic auth is supported by the fixture")
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ChError.make(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                                   "Authentication failed: malformed Basic credentials") from None
        if user is None:
            user, password = params.get("user"), params.get("password")
        user = user or "default"
        password = password or ""
        ok = hmac.compare_digest(user.encode(), self.user.encode())
        ok = hmac.compare_digest(password.encode(), self._password.encode()) and ok
        if not ok:
            raise ChError.make(AUTHENTICATION_FAILED, "AUTHENTICATION_FAILED",
                               f"{user}: Authentication failed: password is incorrect, "
                               "or there is no user with such name")

    # -- requests
    def handle(self, req: Request) -> Reply:
        params = dict(req.params)
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            return self._handle(req, params, query_id)
        except ChError as err:
            return self.error_reply(err, query_id)

    def _handle(self, req: Request, params: dict[str, str], query_id: str) -> Reply:
        self.authenticate(req, params)
        body = decode_body(req.body, req.headers.get("content-encoding", ""))
        ctype = req.headers.get("content-type", "")
        ordered = list(req.params)
        if ctype.lower().startswith("multipart/form-data"):
            form = parse_multipart(ctype, body)
            ordered += form
            params.update(form)
            body = b""
        for flag in ("compress", "decompress"):
            if params.get(flag, "0") not in ("", "0", "false"):
                raise ChError.make(NOT_IMPLEMENTED, "NOT_IMPLEMENTED",
                                   f"'{flag}=1' (ClickHouse block compression) is not supported by the fixture")
        qparam = params.get("query", "")
        raw = (qparam.encode() + b"\n" + body) if qparam else body
        stmt = scan_statement(raw)
        bind = {k[6:]: v for k, v in ordered if k.startswith("param_")}
        settings: dict[str, str] = {}
        for k, v in ordered:
            if k in HTTP_PARAMS or k.startswith("param_"):
                continue
            if not _SETTING_NAME.match(k):
                raise ChError.make(UNKNOWN_SETTING, "UNKNOWN_SETTING", f"Unknown setting '{k}'")
            settings[k] = v
        readonly = settings.pop("readonly", None)
        if req.method == "GET" and readonly in (None, "0", ""):
            readonly = "2"
        database = req.headers.get("x-clickhouse-database") or params.get("database") or None
        fmt = req.headers.get("x-clickhouse-format") or params.get("default_format") or "TabSeparated"
        with self.lock:
            if self._closed:
                raise ChError.make(UNKNOWN_EXCEPTION, "UNKNOWN_EXCEPTION", "fixture is shutting down")
            session_id = params.get("session_id") or None
            session = self._session(session_id, params) if session_id else None
            if database is None and session is not None:
                database = session.database
            out, summary = self._execute(stmt, raw, fmt, bind, settings, readonly, database, session)
            if session_id and params.get("close_session", "0") not in ("", "0", "false"):
                self._sessions.pop(session_id, None)
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": settings.get("session_timezone") or self.timezone,
            "X-ClickHouse-Server-Display-Name": "clickhouse-fixture",
            "X-ClickHouse-Summary": json.dumps(summary, separators=(",", ":")),
        }
        result_format = stmt.output_format or (fmt if stmt.first in RESULT_KEYWORDS else None)
        if stmt.insert_header is None and (result_format or out):
            result_format = result_format or fmt
            headers["X-ClickHouse-Format"] = result_format
            headers["Content-Type"] = _content_type(result_format)
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        return Reply(200, out, headers)

    def _session(self, session_id: str, params: dict[str, str]) -> Session:
        now = time.monotonic()
        for sid in [s for s, sess in self._sessions.items() if sess.expires < now]:
            del self._sessions[sid]
        try:
            timeout = float(params.get("session_timeout") or DEFAULT_SESSION_TIMEOUT)
        except ValueError:
            timeout = -1.0
        if not 0 <= timeout <= MAX_SESSION_TIMEOUT:
            raise ChError.make(INVALID_SESSION_TIMEOUT, "INVALID_SESSION_TIMEOUT",
                               f"Invalid session timeout: '{params.get('session_timeout')}'")
        session = self._sessions.get(session_id)
        if session is None:
            if params.get("session_check", "0") not in ("", "0", "false"):
                raise ChError.make(SESSION_NOT_FOUND, "SESSION_NOT_FOUND", f"Session {session_id} not found")
            session = self._sessions[session_id] = Session()
        session.timeout = timeout
        session.expires = now + timeout
        return session

    def _configured(self, key: tuple[Any, ...], database: str | None, sets: list[str],
                    settings: dict[str, str], readonly: str | None) -> Any:
        conn = self._pool.pop(key, None)
        if conn is not None:
            return conn
        conn = self._connect()
        try:
            if database:
                conn.query(f"USE {_quote_ident(database)}", "TabSeparated")
            for statement in sets:
                conn.query(statement, "TabSeparated")
            for name, value in settings.items():
                conn.query(f"SET {name} = {_quote_literal(value)}", "TabSeparated")
            if readonly is not None:
                conn.query(f"SET readonly = {_quote_literal(readonly)}", "TabSeparated")
        except Exception as exc:
            conn.close()
            raise ChError.from_engine(exc) from None
        return conn

    def _execute(self, stmt: Statement, raw: bytes, fmt: str, bind: dict[str, str],
                 settings: dict[str, str], readonly: str | None, database: str | None,
                 session: Session | None) -> tuple[bytes, dict[str, str]]:
        sets = list(session.sets) if session else []
        key = (database, tuple(sets), tuple(sorted(settings.items())), readonly)
        conn = self._configured(key, database, sets, settings, readonly)
        reusable = False
        try:
            if stmt.insert_header is not None:
                out, summary = b"", self._insert(conn, stmt, raw)
            else:
                res = conn.query(raw, fmt, params=bind)
                out = res.bytes() or b""
                summary = {"read_rows": str(res.rows_read()), "read_bytes": str(res.bytes_read()),
                           "written_rows": str(res.rows_written()), "written_bytes": str(res.bytes_written()),
                           "total_rows_to_read": str(res.rows_read()),
                           "elapsed_ns": str(int(res.elapsed() * 1e9))}
            if session is not None and stmt.first == "USE":
                session.database = conn.query("SELECT currentDatabase()", "TabSeparated").bytes().decode().strip()
            elif session is not None and stmt.first == "SET":
                session.sets.append(raw[:stmt.text_end].decode("utf-8"))
            # SET/USE/temporary tables change the connection; after an error chDB may hand the
            # failed query's partial output to the next query on the same connection.
            reusable = stmt.first not in ("SET", "USE") and not stmt.temporary
            return out, summary
        except ChError:
            raise
        except Exception as exc:
            raise ChError.from_engine(exc) from None
        finally:
            if reusable:
                self._pool[key] = conn
                while len(self._pool) > POOL_SIZE:
                    self._pool.popitem(last=False)[1].close()
            else:
                conn.close()

    @staticmethod
    def _insert(conn: Any, stmt: Statement, raw: bytes) -> dict[str, str]:
        assert stmt.insert_header is not None
        inserter = conn.send_insert(stmt.insert_header, stmt.insert_format)
        try:
            data = raw[stmt.data_start:]
            if data:
                inserter.append(data)
            res = inserter.finish()
        except BaseException:
            try:
                inserter.cancel()
            except Exception:
                pass
            raise
        return {"read_rows": str(res.rows_written), "read_bytes": str(res.bytes_written),
                "written_rows": str(res.rows_written), "written_bytes": str(res.bytes_written),
                "elapsed_ns": str(int(res.elapsed * 1e9))}


# ---------------------------------------------------------------------------- HTTP
class FixtureHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: Engine) -> None:
        self.engine = engine
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "clickhouse-fixture"
    sys_version = ""
    timeout = 600
    server: FixtureHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        """No access log: URLs may carry credentials (``password=``)."""

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, reply: Reply, head_only: bool = False) -> None:
        self.send_response_only(reply.status)
        self.send_header("Date", self.date_time_string())
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Keep-Alive", "timeout=10")
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: no Nagle / delayed-ACK stall between them.
        self._headers_buffer.append(b"\r\n")
        if not head_only:
            self._headers_buffer.append(reply.body)
        self.wfile.write(b"".join(self._headers_buffer))
        self._headers_buffer = []

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        params = parse_qsl(parts.query, keep_blank_values=True)
        body = self._read_body() if self.command != "GET" or self.headers.get("Content-Length") else b""
        path = parts.path.rstrip("/") or "/"
        names = {k for k, _ in params}
        if path in ("/ping", "/replicas_status") or (
                path == "/" and self.command in ("GET", "HEAD") and "query" not in names):
            self._send(Reply(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"}),
                       self.command == "HEAD")
            return
        req = Request(self.command, parts.path, params,
                      {k.lower(): v for k, v in self.headers.items()}, body)
        try:
            reply = self.server.engine.handle(req)
        except Exception as exc:  # a fixture bug: still answer like a server would
            log.exception("fixture error")
            reply = self.server.engine.error_reply(ChError.from_engine(exc))
        self._send(reply)

    do_GET = do_POST = do_HEAD = _dispatch


def _exit_when_stdin_closes(server: FixtureHTTPServer) -> None:
    """Stop when the parent (which holds our stdin pipe) goes away."""
    try:  # os.read, not sys.stdin: a buffered reader's lock breaks interpreter shutdown
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    threading.Thread(target=server.shutdown, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.clickhouse_fixture",
                                 description="TEST FIXTURE: ClickHouse HTTP interface backed by chDB")
    ap.add_argument("--data", required=True, help="chDB data directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--user", default="default")
    ap.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin reaches EOF")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    engine = Engine(Path(args.data), user=args.user, password=os.environ.get(PASSWORD_ENV, ""))
    try:
        server = FixtureHTTPServer((args.host, args.port), engine)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        engine.close()
        return EXIT_PORT_IN_USE

    def _stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.exit_on_stdin_eof:
        threading.Thread(target=_exit_when_stdin_closes, args=(server,), daemon=True).start()
    host, port = server.server_address[:2]
    print(f"{LISTENING} {host}:{port}", flush=True)
    log.info("serving chDB %s at %s", engine.version, engine.path)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        engine.close()
    return 0


# ---------------------------------------------------------------------------- test helper
class ClickHouseFixture:
    """Runs the fixture server as a child process on ``data_dir`` (for synchronous tests).

    ``start()`` returns the base URL; :attr:`dsn` is what a gateway's ``audit_dsn`` should be
    (no extra query parameters are needed: compressed inserts are accepted). ``kill()`` is a
    SIGKILL for outage tests; ``restart()`` reuses the data directory and, if it can, the port.
    """

    def __init__(self, data_dir: Path | str, *, password: str = "", port: int = 0,
                 start_timeout: float = 30.0, log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.password = password
        self.port = port
        self.start_timeout = start_timeout
        self.log_path = log_path or self.data_dir.with_name(self.data_dir.name + ".fixture.log")
        self.port_changed = False
        self.returncode: int | None = None
        """Exit status of the last process stopped or killed (0 = clean shutdown)."""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dsn(self) -> str:
        return f"http://default:{quote(self.password, safe='')}@127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> str:
        """Start the server (on :attr:`port`, 0 = any free port) and return its URL."""
        if self.running:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        code = self._spawn(self.port)
        if code == EXIT_PORT_IN_USE and self.port:
            warnings.warn(f"clickhouse fixture: port {self.port} is taken, moving to a new port",
                          RuntimeWarning, stacklevel=2)
            self.port_changed = True
            code = self._spawn(0)
        if code is not None:
            raise RuntimeError(f"clickhouse fixture did not start (exit {code}):\n{self.logs()[-4000:]}")
        return self.url

    def _spawn(self, port: int) -> int | None:
        """Start the child; None once it listens, else its exit code."""
        env = dict(os.environ)
        env[PASSWORD_ENV] = self.password
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.clickhouse_fixture", "--data", str(self.data_dir),
                 "--port", str(port), "--exit-on-stdin-eof"],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf)
        line = _read_line(proc, self.start_timeout)
        if not line.startswith(LISTENING):
            if proc.poll() is None:
                proc.kill()
            return proc.wait()
        self.port = int(line.rsplit(":", 1)[1])
        self._proc = proc
        return None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit within ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        _close_pipes(proc)

    def kill(self) -> None:
        """SIGKILL: the store vanishes mid-flight, as in an outage."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        self.returncode = proc.wait()
        _close_pipes(proc)

    def restart(self) -> str:
        """Stop (if running) and start again on the same data directory, preferably the same port.

        Returns the URL; if the port could not be reused, :attr:`port_changed` is set and a
        RuntimeWarning is issued.
        """
        self.stop()
        return self.start()

    def __enter__(self) -> "ClickHouseFixture":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The child's first stdout line, or '' if it exits or stays silent for ``timeout`` seconds."""
    assert proc.stdout is not None
    box: list[bytes] = []
    done = threading.Event()

    def reader(stream: IO[bytes]) -> None:
        box.append(stream.readline())
        done.set()
        while stream.read(4096):  # keep draining so the child never blocks on stdout
            pass

    threading.Thread(target=reader, args=(proc.stdout,), daemon=True).start()
    done.wait(timeout)
    return box[0].decode(errors="replace").strip() if box else ""


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
