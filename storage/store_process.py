"""Embedded ClickHouse (chDB) in a child process of its own.

chDB runs ClickHouse inside whichever process opens it: its memory (hundreds of MB of caches
and parts), its insert and merge work and any crash of it would be the proxy's. With
``audit.chdb_process`` (the default) the gateway spawns one child that owns the chDB data
path, and the store's worker thread hands it each store call over a pipe: the function (by
reference: module-level functions only), its arguments, and which client to use. Results
and exceptions come back pickled.

The child exits when the socket closes, so it never outlives the gateway. If it dies, the call
in flight raises :class:`StoreError` and the store counts as closed; the next ``open()``
(the spool's insert retry does that) starts a new child on the same data.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

# Which of the child's two clients a call runs on (see Store: one read-write, one for admin SQL).
READ_WRITE, READ_ONLY = "rw", "ro"


class StoreProcessError(Exception):
    """The store process died, refused to start, or sent back something unusable."""


class _RemoteError(Exception):
    """An exception from the child that could not be pickled: its type name and message."""


def _portable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception is described instead
        return _RemoteError(f"{type(exc).__name__}: {exc}")


_FREEZE_AFTER_CALLS = frozenset({1, 10, 100})
"""The first inserts and queries import more of clickhouse-connect, numpy and pandas."""


def _freeze_heap() -> None:
    """Keep the long-lived objects (chDB, clickhouse-connect, numpy, pandas ...) out of the
    cyclic GC's scans: without this each full collection walked them all, a CPU burst of several
    ms per insert cycle that delays whatever shares the store process's core."""
    gc.collect()
    gc.freeze()


def _serve(conn: Connection, opener: Callable[[], tuple[Any, Any]]) -> None:
    """The child: open both clients, then run calls until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway's Ctrl-C is the gateway's to handle
    try:
        clients = dict(zip((READ_WRITE, READ_ONLY), opener()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send((False, _portable(exc)))
        return
    conn.send((True, os.getpid()))
    _freeze_heap()
    served = 0
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                break
            if message is None:
                break
            which, fn, args, kwargs = message
            try:
                result: tuple[bool, Any] = (True, fn(clients[which], *args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
                result = (False, _portable(exc))
            try:
                conn.send(result)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                conn.send((False, _RemoteError(f"store call result not transferable: {exc}")))
            served += 1
            if served in _FREEZE_AFTER_CALLS:
                _freeze_heap()
    finally:
        for client in clients.values():
            try:
                client.close()
            except Exception:  # noqa: BLE001
                log.debug("error closing a chDB client", exc_info=True)


# -c, not -m: the storage package imports this module, and runpy warns about running it with -m.
CHILD_MAIN = "import sys; from storage.store_process import _main; _main(int(sys.argv[1]), sys.argv[2] == '1')"


def run_in_background() -> None:
    """Lower this process to SCHED_IDLE (nice 19 where that is refused): where it shares a core
    with the proxy, or anything else, a woken task runs at once. An insert is a CPU burst of
    several ms; at nice 10 the scheduler (EEVDF) let it finish its slice first, and calls on
    that core waited 2-4 ms (perf sched, bench). When every core is busy, inserts wait: the
    spool holds the rows and the audit lag grows until the load drops. Set before chDB starts
    its threads, which inherit it."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        os.nice(19)


def _main(fd: int, background: bool = False) -> None:
    """The child's entry (``CHILD_MAIN``): the opener arrives first on the socket FD."""
    if background:
        run_in_background()
    conn = Connection(fd)
    try:
        opener = conn.recv()
    except EOFError:
        return
    _serve(conn, opener)


class StoreProcess:
    """The parent's handle. Calls are made from one thread at a time (the store's worker).

    A fresh interpreter (``python -c ...store_process._main``), not a fork: the gateway has
    threads and, without this, would map chDB; and not multiprocessing's spawn, which re-runs
    the parent's ``__main__`` in the child."""

    START_TIMEOUT_SECONDS = 120.0

    def __init__(self, opener: Callable[[], tuple[Any, Any]]) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", CHILD_MAIN, str(theirs.fileno()), "1"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._conn.send(opener)
            if not self._conn.poll(self.START_TIMEOUT_SECONDS):
                raise StoreProcessError("the store process did not start in time")
            ok, value = self._recv()
        except BaseException:
            self.kill()
            self._conn.close()
            raise
        if not ok:
            self._proc.wait(5)
            self._conn.close()
            raise value
        self.pid: int = value

    def _recv(self) -> tuple[bool, Any]:
        try:
            return self._conn.recv()  # type: ignore[no-any-return]
        except (EOFError, OSError):
            try:
                code = self._proc.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            raise StoreProcessError(f"the store process exited (code {code})") from None

    def call(self, which: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            self._conn.send((which, fn, args, kwargs))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            # Not sent (lambdas and closures cannot cross): a programming error, said plainly.
            raise TypeError(f"store call {getattr(fn, '__qualname__', fn)!r} cannot be sent to the "
                            f"store process (use a module-level function): {exc}") from None
        except (BrokenPipeError, OSError):
            raise StoreProcessError("the store process is gone") from None
        ok, value = self._recv()
        if not ok:
            raise value
        return value

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to close its clients and exit; kill it if it does not."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._conn.close()

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait(5)
