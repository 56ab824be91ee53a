"""Total deadlines for registry requests: the arithmetic, budget scopes, and their enforcement.

An idle timeout (``read_timeout``) ends a request only when the server goes quiet; a registry
that sends one byte every few seconds never does, and would hold a FUSE thread (and the reader
behind it) forever. So every registry request runs inside a *budget*: a point in monotonic time
by which it must be over, connect, TLS, headers and the whole body included, and any retries and
backoff sleeps with them.

- :func:`budget_seconds`: ``base`` (``[registry] request_deadline``) for the request itself,
  plus ``nbytes / min_bytes_per_second`` for a body of ``nbytes``: a 50 MB range over a slow
  but honest link still completes, a dribbler is cut off.
- :func:`budget` opens a scope for the calling thread. Scopes nest; an inner scope never ends
  later than the one around it, so whatever an operation does inside (a token request, a
  second range request, a redirect, urllib3's retries) counts against the caller's budget.
- :class:`Watchdog`: socket timeouts are per read, so a thread blocked in ``recv`` cannot see a
  deadline pass. One watchdog thread shuts down, at a scope's deadline, the sockets of the
  connections that scope still uses; the blocked ``recv`` returns at once and the request fails.
- The urllib3 connection and pool classes (:class:`GuardedAdapter` for ``requests``) attach a
  connection to the thread's current scope when it connects (TLS handshake included) or sends a
  request, and detach it when it goes back to the pool or is closed, so the watchdog only ever
  touches connections still in use by the scope that expired. An attempt that would start after
  the deadline (a urllib3 retry) fails at once with :class:`DeadlineExceeded`.

Pure Python, no trio: used from worker threads only.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

MIN_SOCKET_TIMEOUT = 0.05
"""Shortest socket timeout handed to urllib3 (0 would mean non-blocking)."""


# --- the arithmetic -------------------------------------------------------------------------------
def budget_seconds(base: float, nbytes: int = 0, min_bytes_per_second: float = 0.0) -> float:
    """Seconds a request for a body of *nbytes* may take in all: *base* for the request (connect,
    headers, a small body), plus the time the body takes at the slowest rate still accepted.
    ``min_bytes_per_second <= 0`` means no allowance for the body."""
    if base < 0:
        raise ValueError("a deadline cannot be negative")
    if nbytes <= 0 or min_bytes_per_second <= 0:
        return float(base)
    return float(base) + nbytes / float(min_bytes_per_second)


@dataclass(frozen=True)
class Deadline:
    """A point in ``time.monotonic()`` time; ``seconds`` is the budget it was opened with."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float, now: float | None = None) -> Deadline:
        start = time.monotonic() if now is None else now
        return cls(start + seconds, seconds)

    def remaining(self, now: float | None = None) -> float:
        return max(0.0, self.at - (time.monotonic() if now is None else now))

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.at

    def cap(self, timeout: float, now: float | None = None) -> float:
        """*timeout* (a per-operation socket timeout), shortened to what is left."""
        return max(MIN_SOCKET_TIMEOUT, min(timeout, self.remaining(now)))


class DeadlineExceeded(OSError):
    """Raised inside urllib3 when a connection attempt would start after its scope's deadline
    (an OSError, so urllib3 unwinds its pool state as for any connection failure)."""


# --- scopes ---------------------------------------------------------------------------------------
class _Scope:
    """The connections one budget scope uses; the watchdog shuts them down at ``deadline``."""

    __slots__ = ("__weakref__", "closed", "conns", "deadline", "fired", "lock")

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.lock = threading.Lock()
        self.conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self.fired = False
        self.closed = False

    def attach(self, conn: Any) -> None:
        old = getattr(conn, "_stargz_scope", None)
        if old is not None and old is not self:
            _detach(conn)
        with self.lock:
            if self.closed:
                return
            conn._stargz_scope = self
            self.conns.add(conn)

    def fire(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.fired = True
            for conn in list(self.conns):
                if getattr(conn, "_stargz_scope", None) is self:
                    _shutdown(conn)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for conn in list(self.conns):
                if getattr(conn, "_stargz_scope", None) is self:
                    conn._stargz_scope = None
            self.conns = weakref.WeakSet()


def _detach(conn: Any) -> None:
    scope = getattr(conn, "_stargz_scope", None)
    if scope is None:
        return
    with scope.lock:
        if getattr(conn, "_stargz_scope", None) is scope:
            conn._stargz_scope = None
        scope.conns.discard(conn)


_RAW_LOCK = threading.Lock()  # guards the handshake-time socket duplicates


def _shutdown(conn: Any) -> None:
    """Shut the connection's socket down (both ways): a thread blocked reading it returns."""
    with _RAW_LOCK:
        sock = getattr(conn, "_stargz_raw", None) or getattr(conn, "sock", None)
        if sock is None:
            return
        try:
            # The plain socket method: ssl.SSLSocket.shutdown would also drop its TLS state
            # under the feet of the thread reading it.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, TypeError, ValueError):
            with contextlib.suppress(Exception):
                sock.shutdown(socket.SHUT_RDWR)


class _Local(threading.local):
    def __init__(self) -> None:
        self.scopes: list[_Scope] = []


_local = _Local()


def current() -> Deadline | None:
    """The calling thread's innermost budget, or None outside any scope."""
    scopes = _local.scopes
    return scopes[-1].deadline if scopes else None


def _current_scope() -> _Scope | None:
    scopes = _local.scopes
    return scopes[-1] if scopes else None


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[Deadline]:
    """A budget scope of *seconds* (never ending after the scope around it) for the calling
    thread; yields its :class:`Deadline`. Connections still in use by it when the deadline passes
    are shut down; on exit, connections are released from it."""
    outer = current()
    deadline = Deadline.after(seconds)
    if outer is not None and outer.at <= deadline.at:
        deadline = outer
    scope = _Scope(deadline)
    WATCHDOG.schedule(scope)
    _local.scopes.append(scope)
    try:
        yield deadline
    finally:
        _local.scopes.pop()
        scope.close()
        WATCHDOG.cancel(scope)


@contextlib.contextmanager
def request_scope(seconds: float) -> Iterator[Deadline]:
    """For one request: inside a :func:`budget`, that budget; outside any, a budget of
    *seconds* that (unlike :func:`budget`) stays armed after the block, until its deadline, so
    the body read afterwards is still covered (connections are released when they go back to
    the pool)."""
    scope = _current_scope()
    if scope is not None:
        yield scope.deadline
        return
    scope = _Scope(Deadline.after(seconds))
    WATCHDOG.schedule(scope)
    _local.scopes.append(scope)
    try:
        yield scope.deadline
    finally:
        _local.scopes.pop()


def _attach_current(conn: Any) -> None:
    scope = _current_scope()
    if scope is None:
        return
    if scope.deadline.expired():
        raise DeadlineExceeded(f"deadline of {scope.deadline.seconds:g} s passed")
    scope.attach(conn)


# --- the watchdog ---------------------------------------------------------------------------------
class Watchdog:
    """One daemon thread that fires scopes at their deadlines (started on first use)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Scope]] = []
        self._seq = itertools.count()
        self._live = 0
        self._thread: threading.Thread | None = None
        self.fired = 0

    def schedule(self, scope: _Scope) -> None:
        with self._cond:
            heapq.heappush(self._heap, (scope.deadline.at, next(self._seq), scope))
            self._live += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stargz-deadline-watchdog", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is scope:
                self._cond.notify()

    def cancel(self, scope: _Scope) -> None:
        """*scope* ended before its deadline: forget it (lazily; compacted when many)."""
        with self._cond:
            if not scope.fired:  # a fired scope was counted off when it fired
                self._live -= 1
            if len(self._heap) > 64 and len(self._heap) > 4 * max(self._live, 1):
                self._heap = [e for e in self._heap if not e[2].closed]
                heapq.heapify(self._heap)

    def pending(self) -> int:
        with self._cond:
            return sum(1 for e in self._heap if not e[2].closed)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].closed:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - self._clock()
                    if wait <= 0:
                        scope = heapq.heappop(self._heap)[2]
                        self._live -= 1
                        break
                    self._cond.wait(wait)
            scope.fire()
            self.fired += 1


WATCHDOG = Watchdog()


# --- urllib3 connections and pools that know their scope -----------------------------------------
class _GuardedHTTPConnection(HTTPConnection):
    """Attaches itself to the calling thread's scope when it connects or sends a request."""

    _stargz_scope: _Scope | None = None
    _stargz_raw: socket.socket | None = None

    def connect(self) -> None:
        _attach_current(self)
        try:
            super().connect()
        finally:
            with _RAW_LOCK:
                raw, self._stargz_raw = self._stargz_raw, None
            if raw is not None:
                raw.close()

    def putrequest(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self)
        super().putrequest(*args, **kwargs)

    def close(self) -> None:
        _detach(self)
        super().close()


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()
        if getattr(self, "_stargz_scope", None) is not None:
            # ``ssl`` detaches the plain socket when it wraps it, and the wrapped one becomes
            # ``self.sock`` only after the handshake: a duplicate lets the watchdog end a
            # handshake that dribbles too.
            with _RAW_LOCK:
                self._stargz_raw = sock.dup()
        return sock


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            _detach(conn)
        super()._put_conn(conn)


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            _detach(conn)
        super()._put_conn(conn)


class GuardedAdapter(HTTPAdapter):
    """``requests`` adapter whose connections the deadline watchdog can end."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


__all__ = [
    "WATCHDOG",
    "Deadline",
    "DeadlineExceeded",
    "GuardedAdapter",
    "Watchdog",
    "budget",
    "budget_seconds",
    "current",
    "request_scope",
]
