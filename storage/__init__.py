"""Audit storage in ClickHouse (embedded chDB or a server) through clickhouse-connect."""

from storage.audit import call_to_row, redact_query
from storage.store import QueryError, QueryRejected, Store, StoreError

__all__ = ["QueryError", "QueryRejected", "Store", "StoreError", "call_to_row", "redact_query"]
