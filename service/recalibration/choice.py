"""Which version of a model serves, which one it replaced and which one runs in shadow: kept on disk.

``models_dir/<name>/serving.json`` (a file, so the registry, which loads directories, ignores it). Pins
shared through the state store do not outlive a restart with the in-process ``memory://`` state; this
file does, and every worker applies it when it starts. Written atomically (a temporary file renamed).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SERVING_FILE = "serving.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingChoice:
    active: str | None = None  # the version an admin activated (None: the registry's own choice)
    previous: str | None = None  # the version it replaced: what a rollback serves again
    shadow: str | None = None  # the candidate decided beside the active version

    def activated(self, version: str, replaced: str | None) -> ServingChoice:
        """After activating ``version`` in place of ``replaced``; a shadow that became active stops."""
        previous = replaced if replaced != version else self.previous
        shadow = None if self.shadow == version else self.shadow
        return replace(self, active=version, previous=previous, shadow=shadow)


def choice_path(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / name / SERVING_FILE


def read_choice(models_dir: Path, name: str) -> ServingChoice:
    path = choice_path(models_dir, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ServingChoice()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{name}/{SERVING_FILE}: expected JSON {{active, previous, shadow}}, got: {exc}"
        ) from exc
    fields = {k: data.get(k) for k in ("active", "previous", "shadow")}
    bad = {k: v for k, v in fields.items() if v is not None and not isinstance(v, str)}
    if bad:
        raise ValueError(f"{name}/{SERVING_FILE}: expected versions as strings or null, got {bad}")
    return ServingChoice(**fields)


def read_choice_or_fresh(models_dir: Path, name: str) -> ServingChoice:
    """The choice on disk, or a fresh one when the file is unreadable (logged; the next write replaces it)."""
    try:
        return read_choice(models_dir, name)
    except ValueError as exc:
        log.warning("%s; it will be rewritten", exc)
        return ServingChoice()


def write_choice(models_dir: Path, name: str, choice: ServingChoice) -> None:
    path = choice_path(models_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{SERVING_FILE}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(choice), handle, indent=2)
            handle.write("\n")
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
