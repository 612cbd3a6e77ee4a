"""The service's shared state: one small interface, three stores behind ``BLDA_STATE_URL``.

Everything that workers and replicas must agree on lives here: served predictions awaiting feedback
(:mod:`service.feedback`), the registry's generation and desired versions (:mod:`service.sync`), and
later the statistics recalibration accumulates. The interface is deliberately small: byte values with an
optional time to live, an atomic take (get and delete: "only one feedback wins"), and an atomic integer
increment (generation counters, tallies).

=====================  ===================================================================
``memory://``          in this process only (the default with one worker); bounded in entries
``sqlite:///path.db``  every process on one host (``blda serve --workers N`` creates one)
``redis://host:port``  every worker of every replica (needs the ``redis`` package)
=====================  ===================================================================

Keys are plain strings; callers prefix them by purpose (``feedback/``, ``registry/``). Values are bytes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


class StateError(RuntimeError):
    """The shared state store cannot be reached or used."""


class StateStore(Protocol):
    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None when absent or expired; a counter reads as its decimal digits."""
        ...

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Set ``key`` (replacing any value); it expires after ``ttl_s`` seconds unless None."""
        ...

    def take(self, key: str) -> bytes | None:
        """Get and delete ``key`` atomically: of concurrent takers, exactly one gets the value."""
        ...

    def incr(self, key: str, amount: int = 1) -> int:
        """Add ``amount`` to the integer at ``key`` (0 when absent) atomically; the new value. No expiry."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """In this process: a dict with expiry, at most ``max_entries`` keys (the oldest written go first)."""

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"expected max_entries >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[str, tuple[bytes | int, float | None]] = (
            OrderedDict()
        )  # key -> (value, expires)
        self.evicted = 0

    def _live(self, key: str, now: float) -> bytes | int | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= now:
            del self._data[key]
            return None
        return value

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._live(key, self._clock())
        return str(value).encode() if isinstance(value, int) else value

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        with self._lock:
            now = self._clock()
            self._data[key] = (value, None if ttl_s is None else now + ttl_s)
            self._data.move_to_end(key)
            self._bound(now)

    def take(self, key: str) -> bytes | None:
        with self._lock:
            value = self._live(key, self._clock())
            if not isinstance(value, bytes):
                return None
            del self._data[key]
            return value

    def incr(self, key: str, amount: int = 1) -> int:
        with self._lock:
            current = self._live(key, self._clock())
            total = (current if isinstance(current, int) else 0) + amount
            self._data[key] = (total, None)
            return total

    def keys(self, prefix: str) -> list[str]:
        """Live keys starting with ``prefix`` (for sizes and tests; not part of the shared interface)."""
        with self._lock:
            now = self._clock()
            return [k for k in list(self._data) if k.startswith(prefix) and self._live(k, now) is not None]

    def _bound(self, now: float) -> None:
        # Expired entries first (oldest at the front), then the oldest live ones.
        while self._data:
            key, (_, expires) = next(iter(self._data.items()))
            if expires is not None and expires <= now:
                del self._data[key]
            else:
                break
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evicted += 1

    def close(self) -> None:
        pass


def _with_busy_retry(step: Callable[[], object], attempts: int = 100, pause_s: float = 0.05) -> None:
    """Run `step`, retrying while SQLite says the database is locked (bounded: ~5 s). Switching a new file
    to WAL takes an exclusive lock that SQLite's busy timeout does not wait for, so workers starting
    together could fail their start-up with "database is locked"."""
    for attempt in range(attempts):
        try:
            step()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(pause_s)


class SqliteStore:
    """Every process on one host, through one SQLite file (WAL: readers do not block the writer)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._local = threading.local()
        db = self._connection()
        _with_busy_retry(
            lambda: db.execute(
                "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB, num INTEGER, expires REAL)"
            )
        )

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                # One connection per thread; autocommit, with explicit transactions where atomicity matters.
                db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=True)
                _with_busy_retry(lambda: db.execute("PRAGMA journal_mode=WAL"))
                db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise StateError(
                    f"state store {self.path}: expected a writable SQLite file, got {exc}"
                ) from exc
            self._local.db = db
        return db

    def get(self, key: str) -> bytes | None:
        row = (
            self._connection()
            .execute(
                "SELECT value, num FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, self._clock()),
            )
            .fetchone()
        )
        if row is None:
            return None
        return bytes(row[0]) if row[0] is not None else str(row[1]).encode()

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        now = self._clock()
        expires = None if ttl_s is None else now + ttl_s
        db = self._connection()
        db.execute(
            "INSERT INTO kv (key, value, num, expires) VALUES (?, ?, NULL, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value, num = NULL, expires = excluded.expires",
            (key, value, expires),
        )
        # Expired rows go now and then, not on every write.
        if hash(key) % 64 == 0:
            db.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))

    def take(self, key: str) -> bytes | None:
        row = (
            self._connection()
            .execute(
                "DELETE FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?) RETURNING value",
                (key, self._clock()),
            )
            .fetchone()
        )
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def incr(self, key: str, amount: int = 1) -> int:
        row = (
            self._connection()
            .execute(
                "INSERT INTO kv (key, value, num, expires) VALUES (?, NULL, ?, NULL) "
                "ON CONFLICT(key) DO UPDATE SET num = COALESCE(num, 0) + excluded.num RETURNING num",
                (key, amount),
            )
            .fetchone()
        )
        return int(row[0])

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class RedisStore:
    """Every worker of every replica, through one Redis (``redis://host:port/db``)."""

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError as exc:
            raise StateError(
                f"state store {url}: expected the redis package (pip install redis), got none"
            ) from exc
        self.url = url
        # Bounded waits: a Redis that stops answering fails a request instead of hanging it.
        self._redis: Any = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._redis, method)(*args, **kwargs)
        except self._errors as exc:
            raise StateError(f"state store: redis {method} failed: {type(exc).__name__}") from exc

    def get(self, key: str) -> bytes | None:
        value = self._call("get", key)
        return bytes(value) if value is not None else None

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._call("set", key, value, px=None if ttl_s is None else max(1, int(ttl_s * 1000)))

    def take(self, key: str) -> bytes | None:
        value = self._call("getdel", key)
        return bytes(value) if value is not None else None

    def incr(self, key: str, amount: int = 1) -> int:
        return int(self._call("incrby", key, amount))

    def ping(self) -> None:
        self._call("ping")

    def close(self) -> None:
        self._redis.close()


def open_store(url: str, max_entries: int = 100_000) -> StateStore:
    """The store named by ``url`` (``memory://``, ``sqlite:///path``, ``redis://...``), checked reachable."""
    scheme = urlparse(url).scheme
    if scheme == "memory":
        return MemoryStore(max_entries)
    if scheme == "sqlite":
        path = Path(urlparse(url).path)
        if not path.parent.is_dir():
            raise StateError(f"state store: expected an existing directory for {path.name}, got none")
        return SqliteStore(path)
    if scheme in ("redis", "rediss", "unix"):
        store = RedisStore(url)
        store.ping()
        return store
    raise StateError(f"state store: expected a memory://, sqlite:/// or redis:// URL, got scheme {scheme!r}")
