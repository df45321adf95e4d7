"""The ClickHouse connection: one clickhouse-connect client driven from one worker thread.

``chdb:///abs/path`` runs ClickHouse embedded (chDB), by default in a child process of its own
(storage/store_process.py; ``process=False`` keeps it in this process); ``http(s)://user:pass@host:port``
talks to a server. Every client call runs on a single dedicated thread, never on the event loop:
the chDB handle is not safe to use concurrently, and blocking I/O must not stall the proxy.
Calls are ``run(fn, *args)`` with ``fn(client, *args)``; with a store process ``fn`` must be a
module-level function (it crosses to the child by reference).

chDB hosts one engine per process: every open client must use the same data path, and a
different path can be opened only after all clients on the previous one are closed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import ipaddress
import logging
import math
import re
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from storage import schema
from storage.audit import redact_query
from storage.store_process import READ_ONLY, READ_WRITE, StoreProcess, StoreProcessError

log = logging.getLogger(__name__)
T = TypeVar("T")

READONLY_KEYWORDS = frozenset({"SELECT", "WITH", "DESCRIBE", "DESC", "SHOW", "EXPLAIN"})
# Refused anywhere in an admin query (outside strings, quoted identifiers and comments).
# INTO OUTFILE writes a file from the gateway process under chDB even with readonly=1.
WRITE_KEYWORDS = frozenset({
    "INSERT", "ALTER", "DROP", "CREATE", "TRUNCATE", "DELETE", "UPDATE", "RENAME", "ATTACH",
    "DETACH", "OPTIMIZE", "GRANT", "REVOKE", "KILL", "EXCHANGE", "UNDROP", "BACKUP", "RESTORE",
    "OUTFILE", "INFILE",
})


# ClickHouse's table functions (system.table_functions of chDB 4.4; tests/test_storage.py checks
# the list against the running store): they read files and URLs, reach other servers, run
# programs. DESCRIBE file(...) / url(...) reads the file or fetches the URL even with readonly=1,
# and the error it raises quotes what it read. A call to one is refused wherever it appears,
# except the generators, which read nothing (numbers(), values() ...).
GENERATORS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "primes", "generate_series",
                        "generateseries", "values", "sqlstandardvalues", "null"})
TABLE_FUNCTIONS = frozenset(name.lower() for name in (
    "SQLStandardValues", "arrowstream", "azureBlobStorage", "azureBlobStorageCluster", "bigquery",
    "cluster", "clusterAllReplicas", "cosn", "deltaLake", "deltaLakeAzure", "deltaLakeAzureCluster",
    "deltaLakeCluster", "deltaLakeLocal", "deltaLakeS3", "deltaLakeS3Cluster", "dictionary", "eval",
    "executable", "file", "fileCluster", "filesystem", "format", "fuzzJSON", "fuzzQuery", "gcs",
    "generateRandom", "generateSeries", "generate_series", "hdfs", "hdfsCluster", "hudi",
    "hudiCluster", "iceberg", "icebergAzure", "icebergAzureCluster", "icebergCluster",
    "icebergHDFS", "icebergHDFSCluster", "icebergLocal", "icebergLocalCluster", "icebergS3",
    "icebergS3Cluster", "input", "jdbc", "loop", "merge", "mergeTreeAnalyzeIndexes",
    "mergeTreeAnalyzeIndexesUUID", "mergeTreeCodecBlockCounts", "mergeTreeIndex",
    "mergeTreeProjection", "mergeTreeTextIndex", "mongodb", "mysql", "null", "numbers",
    "numbers_mt", "odbc", "oss", "paimon", "paimonAzure", "paimonAzureCluster", "paimonCluster",
    "paimonHDFS", "paimonHDFSCluster", "paimonLocal", "paimonS3", "paimonS3Cluster", "postgresql",
    "primes", "prometheusQuery", "prometheusQueryRange", "python", "redis", "remote",
    "remoteSecure", "s3", "s3Cluster", "sqlite", "timeSeriesData", "timeSeriesMetricFamilies",
    "timeSeriesMetrics", "timeSeriesSamples", "timeSeriesSelector", "timeSeriesTags", "url",
    "urlCluster", "values", "view", "viewExplain", "viewIfPermitted", "ytsaurus", "zeros",
    "zeros_mt",
))
_REFUSED_CALLS = TABLE_FUNCTIONS - GENERATORS


class StoreError(Exception):
    """The audit store cannot be used (not open, cannot connect, bad configuration)."""


class QueryRejected(StoreError):
    """An admin query that is not a single read-only statement."""


class QueryError(StoreError):
    """ClickHouse refused or failed a query; the message is the server's."""


def redact_dsn(dsn: str) -> str:
    """The DSN with its password (and credential-like query parameters) replaced."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    netloc = parts.netloc
    if "@" not in netloc and not parts.query:
        return dsn
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, redact_query(parts.query), parts.fragment))


# ---------------------------------------------------------------------------- SQL guard
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEREDOC = re.compile(r"\$([A-Za-z0-9_]*)\$")


def _tokens(sql: str) -> list[tuple[str, int, int]]:
    """Split SQL into ('word'|'punct'|'literal', start, end) tokens, dropping comments.

    Errs towards seeing *more* code than ClickHouse would: block comments do not nest, and
    ``#`` is not a comment here. Unterminated strings and comments are rejected.
    """
    out: list[tuple[str, int, int]] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise QueryRejected("unterminated /* comment")
            i = j + 2
        elif ch in "'\"`":
            j = i + 1
            while True:
                if j >= n:
                    raise QueryRejected("unterminated quoted string or identifier")
                if sql[j] == "\\":
                    j += 2
                elif sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:  # doubled quote
                        j += 2
                    else:
                        break
                else:
                    j += 1
            out.append(("literal", i, j + 1))
            i = j + 1
        elif ch == "$" and (m := _HEREDOC.match(sql, i)):
            end = sql.find(m.group(0), m.end())
            if end < 0:
                raise QueryRejected("unterminated heredoc string")
            out.append(("literal", i, end + len(m.group(0))))
            i = end + len(m.group(0))
        elif m := _WORD.match(sql, i):
            out.append(("word", i, m.end()))
            i = m.end()
        else:
            out.append(("punct", i, i + 1))
            i += 1
    return out


def check_readonly_sql(sql: str) -> str:
    """Return the single read-only statement in ``sql`` (trailing ';' and comments removed).

    Raises QueryRejected unless it is one statement starting with SELECT, WITH, DESCRIBE,
    DESC, SHOW or EXPLAIN and free of write keywords. The server-side ``readonly=1`` setting
    is the second line of defence.
    """
    toks = _tokens(sql)
    while toks and toks[-1][0] == "punct" and sql[toks[-1][1]] == ";":
        toks.pop()
    if not toks:
        raise QueryRejected("empty query")
    first = sql[toks[0][1]:toks[0][2]].upper()
    if toks[0][0] != "word" or first not in READONLY_KEYWORDS:
        raise QueryRejected("only SELECT, WITH, DESCRIBE, DESC, SHOW and EXPLAIN queries are allowed")
    for idx, (kind, start, end) in enumerate(toks):
        if kind == "punct" and sql[start] == ";":
            raise QueryRejected("only one statement is allowed")
        if idx + 1 < len(toks) and toks[idx + 1][0] == "punct" and sql[toks[idx + 1][1]] == "(":
            _check_call(sql[start:end], kind)
        word = sql[start:end].upper() if kind == "word" else ""
        if idx == 1 and first == "SHOW" and word == "CREATE":  # SHOW CREATE TABLE ...
            continue
        if word in WRITE_KEYWORDS:
            raise QueryRejected(
                f"{word} is not allowed in a read-only query "
                "(quote an identifier of that name with backticks)")
    return sql[toks[0][1]:toks[-1][2]]


def _check_call(name: str, kind: str) -> None:
    """Refuse a call of a table function, or of anything named by a quoted identifier."""
    if kind == "literal":
        if name[0] in "`\"":
            raise QueryRejected(f"calling {name} (a quoted name) is not allowed in an audit query")
    elif name.lower() in _REFUSED_CALLS:
        raise QueryRejected(f"table function {name}() is not allowed in an audit query "
                            "(it reads files or URLs, or reaches other servers)")


def to_json_value(value: Any) -> Any:
    """A query result value as something json.dumps accepts (and strict parsers read)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(to_json_value(k)): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (uuid.UUID, dt.datetime, dt.date, dt.time, Decimal,
                          ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    return str(value)


# ---------------------------------------------------------------------------- Store
class Store:
    """Async facade over one clickhouse-connect client (plus a read-only one for admin SQL)."""

    def __init__(self, dsn: str, *, database: str = schema.DEFAULT_DATABASE, ttl_days: int = 90,
                 connect_timeout_seconds: float = 10.0, query_timeout_seconds: float = 30.0,
                 process: bool = False) -> None:
        self.dsn = dsn
        self.process = process and dsn.startswith("chdb:")
        self._child: StoreProcess | None = None
        self.database = schema.validate_database(database)
        self.ttl_days = ttl_days
        self.connect_timeout_seconds = connect_timeout_seconds
        self.query_timeout_seconds = query_timeout_seconds
        self._executor: ThreadPoolExecutor | None = None
        self._client: Any = None
        self._ro_client: Any = None
        self._ping: asyncio.Future[bool] | None = None

    @classmethod
    def from_config(cls, config: Any) -> "Store":
        """Build from a ``gateway.config.Config``."""
        return cls(config.audit_dsn, database=config.audit.database, ttl_days=config.audit.ttl_days,
                   process=config.audit.chdb_process)

    @property
    def safe_dsn(self) -> str:
        return redact_dsn(self.dsn)

    @property
    def is_open(self) -> bool:
        return self._client is not None

    def _opener(self) -> "functools.partial[tuple[Any, Any]]":
        return functools.partial(open_clients, self.dsn, self.database, self.ttl_days,
                                 self.connect_timeout_seconds)

    def _open_sync(self) -> tuple[Any, Any]:
        if not self.process:
            return self._opener()()
        self._child = StoreProcess(self._opener())
        log.info("audit store process started (pid %d)", self._child.pid)
        return READ_WRITE, READ_ONLY

    async def open(self) -> None:
        """Connect and apply migrations. Raises StoreError naming the DSN (without password)."""
        if self._client is not None:
            return
        if not self.dsn.startswith(("chdb:", "http://", "https://")):
            raise StoreError(f"audit DSN {self.safe_dsn}: expected chdb:///path, http:// or https://")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentgate-clickhouse")
        loop = asyncio.get_running_loop()
        try:
            self._client, self._ro_client = await loop.run_in_executor(self._executor, self._open_sync)
        except Exception as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            message = str(exc)
            password = urlsplit(self.dsn).password
            if password:
                message = message.replace(password, "***")
            raise StoreError(f"cannot open audit store {self.safe_dsn}: {message}") from None
        log.info("audit store open: %s (database %s)", self.safe_dsn, self.database)

    async def close(self) -> None:
        """Close both clients on the worker (after any queued work) and stop the worker."""
        if self._executor is None:
            return
        executor, clients, child = self._executor, (self._client, self._ro_client), self._child
        self._client = self._ro_client = self._child = None

        def _close() -> None:
            if child is not None:
                child.close()
                return
            for c in clients:
                if c is not None:
                    try:
                        c.close()
                    except Exception:
                        log.debug("error closing ClickHouse client", exc_info=True)

        try:
            await asyncio.get_running_loop().run_in_executor(executor, _close)
        finally:
            self._executor = None
            executor.shutdown(wait=False)

    async def _submit(self, fn: Callable[..., T], client: Any, *args: Any, **kw: Any) -> T:
        if self._executor is None or client is None:
            raise StoreError("audit store is not open")
        child = self._child
        if child is None:
            call = functools.partial(fn, client, *args, **kw)
        else:
            call = functools.partial(child.call, client, fn, args, kw)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except StoreProcessError as exc:
            log.error("audit store process failed: %s; it is restarted on the next open", exc)
            await self._lost(child)
            raise StoreError(f"audit store {self.safe_dsn}: {exc}") from None

    async def _lost(self, child: StoreProcess | None) -> None:
        """The store process died: count the store as closed, so open() starts a new one."""
        if child is not None and child is self._child:
            await self.close()

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run ``fn(client, *args, **kw)`` on the worker thread and return its result."""
        return await self._submit(fn, self._client, *args, **kw)

    async def ping(self, timeout: float = 3.0) -> bool:
        """True if the backend answers within ``timeout``; concurrent callers share one probe."""
        if self._client is None:
            return False
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self.run(_ping))
        try:
            return await asyncio.wait_for(asyncio.shield(self._ping), timeout)
        except Exception:
            return False

    async def query_readonly(self, sql: str, *, limit: int) -> tuple[list[str], list[list[Any]]]:
        """Run one read-only admin statement; at most ``limit`` rows, JSON-safe values."""
        if limit < 1:
            raise QueryRejected("limit must be at least 1")
        statement = check_readonly_sql(sql)
        # Order matters: settings are checked before readonly=1 takes effect, and with
        # readonly=1 a query cannot override them with its own SETTINGS clause.
        settings = {
            "max_result_rows": limit,
            "result_overflow_mode": "break",
            "max_execution_time": max(1, math.ceil(self.query_timeout_seconds)),
            "readonly": 1,
        }

        try:
            return await self._submit(_readonly_query, self._ro_client, statement, settings, limit)
        except ClickHouseError as exc:
            raise QueryError(str(exc).strip()) from None


def open_clients(dsn: str, database: str, ttl_days: int, connect_timeout: float) -> tuple[Any, Any]:
    """Connect (twice), applying migrations on the first: (read-write client, admin SQL client).

    Module-level: a store process runs it in the child."""
    kwargs: dict[str, Any] = {"dsn": dsn}
    if not dsn.startswith("chdb:"):
        kwargs["connect_timeout"] = connect_timeout
    client = clickhouse_connect.get_client(**kwargs)
    try:
        schema.apply_migrations(client, database, ttl_days)
        # A separate handle (chDB) / session (HTTP) keeps admin queries' settings apart.
        ro_client = clickhouse_connect.get_client(**kwargs)
    except BaseException:
        client.close()
        raise
    return client, ro_client


def _ping(client: Any) -> bool:
    return bool(client.ping())


def _readonly_query(client: Any, statement: str, settings: dict[str, Any],
                    limit: int) -> tuple[list[str], list[list[Any]]]:
    # 'break' stops at a block boundary, so the result is also trimmed here.
    res = client.query(statement, settings=settings)
    rows = [[to_json_value(v) for v in row] for row in res.result_rows[:limit]]
    return list(res.column_names), rows


def insert_rows(client: Any, table: str, rows: list[tuple[Any, ...]], database: str,
                column_names: list[str] | tuple[str, ...], column_type_names: list[str] | tuple[str, ...]) -> None:
    """``client.insert`` as a module-level function (store calls cross to a store process)."""
    client.insert(table, rows, database=database, column_names=list(column_names),
                  column_type_names=list(column_type_names))
