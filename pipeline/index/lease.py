"""One writer per output: a lease object (`lease.json`) with an owner and an expiry.

`fit` and `build` hold the lease of their output for their whole run. Acquiring is atomic
(`Storage.create`: os.link locally, a conditional PUT `If-None-Match: *` on S3), so of two
jobs started together exactly one gets it; the other is refused with the holder's name and
expiry. A background heartbeat renews the lease (compare-and-swap on the bytes it last
wrote) every `ttl / 4` seconds; the end of the run releases it.

A killed driver leaves its lease behind. It stops blocking when it expires (`ttl` after the
last heartbeat), or at once when its owner ran on this host and its pid is gone. An expired
or dead lease is taken over with a warning; `force=True` takes over a live one. Every
change goes through a compare-and-swap, so two jobs taking over the same stale lease cannot
both win; a holder that finds another owner at its next heartbeat has lost the lease and
its run fails (`LeaseLostError`) instead of finishing silently alongside the new owner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.index.layout import LEASE
from pipeline.storage import _TMP_PREFIX as TEMPORARY_PREFIX  # the hidden temp files
from pipeline.storage import LocalStorage, Storage

DEFAULT_TTL = 60.0  # seconds; generous against clock skew, short enough for a rerun to wait
_ATTEMPTS = 5  # rounds of acquire against concurrent changes before giving up

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live job holds the output's lease."""


class LeaseLostError(RuntimeError):
    """The lease was taken over by another job while this one ran."""


@dataclass(frozen=True)
class Holder:
    """What a lease object says: who holds it and until when (epoch seconds)."""

    host: str
    pid: int
    id: str
    verb: str
    acquired: float
    expires: float

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """None for an unreadable lease object (treated as stale)."""
        try:
            raw = json.loads(data)
            owner = raw["owner"]
            return cls(
                str(owner["host"]),
                int(owner["pid"]),
                str(owner["id"]),
                str(owner["verb"]),
                float(raw["acquired"]),
                float(raw["expires"]),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"`{self.verb}` pid {self.pid} on {self.host} (lease {self.id[:8]})"

    def dead_here(self) -> bool:
        """Its process ran on this host and no longer exists (pid reuse errs on 'alive')."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
        return False


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class Lease:
    """The lease of `storage` for one run of `verb`; use as a context manager."""

    def __init__(
        self, storage: Storage, verb: str, ttl: float = DEFAULT_TTL, force: bool = False
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self.storage, self.verb, self.ttl, self.force = storage, verb, ttl, force
        self.id = uuid.uuid4().hex
        self.acquired = 0.0
        self.current: bytes | None = None  # the bytes we last wrote
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fresh_folder: str | None = None  # set on enter: removed if the run fails

    # -- the object ------------------------------------------------------------------------

    def _payload(self, now: float) -> bytes:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "id": self.id, "verb": self.verb}
        body: dict[str, Any] = {
            "owner": owner,
            "acquired": self.acquired or now,
            "renewed": now,
            "expires": now + self.ttl,
            "ttl": self.ttl,
            "expires_utc": _iso(now + self.ttl),
        }
        return json.dumps(body, sort_keys=True).encode()

    def _read(self) -> bytes | None:
        try:
            return self.storage.read_bytes(LEASE)
        except FileNotFoundError:
            return None

    def _mine(self, data: bytes | None) -> bool:
        holder = Holder.parse(data) if data is not None else None
        return holder is not None and holder.id == self.id

    # -- acquire / renew / release -----------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeldError naming the live holder and its expiry."""
        for _ in range(_ATTEMPTS):
            now = time.time()
            self.acquired = now
            payload = self._payload(now)
            if self.storage.create(LEASE, payload):
                self.current = payload
                return
            found = self._read()
            if self._mine(found):  # our create went through but its answer was lost
                self.current = found
                return
            if found is None:
                continue  # released between our create and read: try again
            if self._take_over(found, payload, now):
                return
        raise LeaseHeldError(
            f"could not acquire {self.storage.url(LEASE)}: it kept changing under concurrent jobs"
        )

    def _take_over(self, found: bytes, payload: bytes, now: float) -> bool:
        """Replace a stale (or, forced, a live) lease; raise LeaseHeldError for a live one."""
        holder = Holder.parse(found)
        if holder is None:
            why = "unreadable"
        elif holder.dead_here():
            why = f"held by {holder.describe()}, whose process is gone"
        elif holder.expires <= now:
            why = f"held by {holder.describe()}, expired at {_iso(holder.expires)}"
        elif self.force:
            why = f"held by {holder.describe()} until {_iso(holder.expires)}; forced"
        else:
            raise LeaseHeldError(
                f"{self.storage.url(LEASE)} is held by {holder.describe()} since "
                f"{_iso(holder.acquired)}, until {_iso(holder.expires)} "
                f"({holder.expires - now:.0f}s from now, renewed while it runs): another job "
                "is writing this output. Wait for it, or pass --force (force=true) to take over."
            )
        if self.storage.replace_if(LEASE, found, payload):
            self.current = payload
        elif self._mine(now_there := self._read()):  # our swap went through, answer lost
            self.current = now_there
        else:
            return False  # someone else changed it first: look again
        log.warning("took over the lease of %s: %s", self.storage.uri, why)
        return True

    def renew(self) -> bool:
        """Extend the expiry; False (and `lost` set) when another job holds the lease now."""
        with self._lock:
            if self.lost or self.current is None:
                return False
            payload = self._payload(time.time())
            if self.storage.replace_if(LEASE, self.current, payload):
                self.current = payload
                return True
            found = self._read()  # a lost response to our own swap reads back as ours
            if self._mine(found):
                self.current = found
                return True
            holder = Holder.parse(found) if found is not None else None
            self.lost = f"now held by {holder.describe()}" if holder else "removed"
            log.error("lost the lease of %s: %s", self.storage.uri, self.lost)
            return False

    def release(self) -> None:
        """Delete the lease if it is still ours."""
        with self._lock:
            if self.current is None or self.lost:
                return
            if not self.storage.replace_if(LEASE, self.current, None) and self._mine(self._read()):
                log.warning("could not release the lease of %s", self.storage.uri)
            self.current = None

    # -- heartbeat ---------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a transient store error: the next beat retries
                log.warning("lease heartbeat on %s failed: %s", self.storage.uri, exc)

    def __enter__(self) -> Lease:
        self.fresh_folder = fresh_local_folder(self.storage)
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()
        if kind is not None and self.fresh_folder:
            remove_if_only_temporary(self.fresh_folder)
        if self.lost and kind is None:
            raise LeaseLostError(
                f"the lease of {self.storage.uri} was taken over while this {self.verb} ran "
                f"({self.lost}); its output may mix two runs: rerun it"
            )


def fresh_local_folder(storage: Storage) -> str | None:
    """The output's folder when it is local and does not exist yet (this run creates it)."""
    root = getattr(storage, "root", None) if isinstance(storage, LocalStorage) else None
    return root if root is not None and not os.path.exists(root) else None


def remove_if_only_temporary(folder: str) -> None:
    """Remove a folder a failed run created when it holds nothing but the storage's hidden
    temporary files (the lease's lock file): a failed first run leaves no folder behind.
    Anything else in it (another job's lease, a part) keeps it."""
    try:
        names = os.listdir(folder)
        if any(not name.startswith(TEMPORARY_PREFIX) for name in names):
            return
        for name in names:
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    except OSError as error:  # a subfolder, or another job writing now: leave it
        log.debug("kept %s: %s", folder, error)


def hold_lease(storage: Storage, verb: str, force: bool = False) -> Lease:
    """The lease of an output for one run of `verb` (a context manager)."""
    return Lease(storage, verb, force=force)
