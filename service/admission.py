"""Admission: how many requests a process takes on at once, in two separate budgets.

- *uploads in transit* (``max_uploads_in_transit``): bodies being received. Each is bounded in bytes and
  in time (:class:`service.uploads.BodyLimits`), so this bounds their memory and how long a slow
  sender keeps its place.
- *work* (``max_pending_requests``): requests whose body has fully arrived, queued or running.

A slot of the second kind is taken only after the body is in, so connections trickling bodies in
cannot take the slots of requests that are ready to run. Both refuse at once (503 ``overloaded``,
``Retry-After``) rather than queue. Only the event loop changes the counters: no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.inference import InferenceRunner
from service.problems import Problem
from service.settings import ServiceSettings


@contextmanager
def upload_slot(runner: InferenceRunner, settings: ServiceSettings) -> Iterator[None]:
    limit = settings.max_uploads_in_transit
    if runner.uploading >= limit:
        raise Problem("overloaded", f"expected at most {limit} request bodies in transit, got more")
    runner.uploading += 1
    try:
        yield
    finally:
        runner.uploading -= 1


@contextmanager
def work_slot(runner: InferenceRunner, settings: ServiceSettings) -> Iterator[None]:
    limit = settings.max_pending_requests
    if runner.pending >= limit:
        raise Problem("overloaded", f"expected at most {limit} requests in progress, got more")
    runner.pending += 1
    try:
        yield
    finally:
        runner.pending -= 1


def overload(runner: InferenceRunner, settings: ServiceSettings) -> str | None:
    """Why this process would refuse a new request now, or None."""
    if runner.pending >= settings.max_pending_requests:
        return f"{runner.pending} requests in progress (limit {settings.max_pending_requests})"
    if runner.uploading >= settings.max_uploads_in_transit:
        return f"{runner.uploading} request bodies in transit (limit {settings.max_uploads_in_transit})"
    return None


def load(runner: InferenceRunner, settings: ServiceSettings) -> dict[str, int]:
    return {
        "requests_in_progress": runner.pending,
        "max_pending_requests": settings.max_pending_requests,
        "uploads_in_transit": runner.uploading,
        "max_uploads_in_transit": settings.max_uploads_in_transit,
    }
