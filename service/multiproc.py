"""Live gauges of dead workers: found and removed, so ``livesum`` gauges never count a dead process.

A worker that exits cleanly marks itself dead (``service.telemetry.stop_monitoring``); one that is
killed cannot, and its ``gauge_live*_<pid>.db`` files would keep, say, ``blda_http_requests_in_flight``
inflated for good. uvicorn restarts the dead worker; the new one (and every scrape) removes the files
of processes that no longer exist.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from prometheus_client import multiprocess

log = logging.getLogger(__name__)

_LIVE_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, someone else's
        return True
    return True


def reap_dead_workers(directory: str | Path) -> list[int]:
    """Mark every process whose live-gauge files are in ``directory`` but which is gone as dead; their pids."""
    pids = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        match = _LIVE_FILE.match(path.name)
        if match:
            pids.add(int(match.group(1)))
    dead = sorted(pid for pid in pids if pid != os.getpid() and not _alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, path=str(directory))
        log.warning("removed the live gauges of dead worker %d", pid)
    return dead
