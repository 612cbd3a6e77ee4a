"""The served models: every version of every bundle below ``models_dir``, and which version is active.

``models_dir/<name>/<version>/`` is one bundle. At start and on reload each version is loaded and
validated; a version that fails is reported (``error``) and never served. The active version of a model
is the one pinned (by activation, else by settings) when it is loaded, else the highest loaded version.
A version whose reload fails keeps serving the copy loaded before.

Thread safety: loads run outside the event loop, one at a time (a lock); each finished reload swaps in a
new immutable :class:`ModelState`, so a reader sees either the old state or the new one, and a request
keeps the :class:`ServedModel` it started with until it finishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from calibration.bundle import BundleError, version_key
from service.inference import ServedModel
from service.names import InvalidName, check_name, is_valid_name

log = logging.getLogger(__name__)

Loader = Callable[[Path], ServedModel]


class RegistryError(Exception):
    pass


class ModelNotFound(RegistryError):
    pass


class VersionNotFound(RegistryError):
    pass


class VersionNotLoadable(RegistryError):
    pass


class NotReady(RegistryError):
    pass


class BadName(RegistryError):
    """A model name or version outside service.names.NAME_PATTERN: refused before touching the disk."""


@dataclass(frozen=True)
class VersionState:
    version: str
    directory: Path
    model: ServedModel | None  # what serves for this version (kept when a later reload of it failed)
    error: str | None  # why the last load failed; None when it succeeded
    checked_at: float  # unix time of the last load attempt

    @property
    def status(self) -> str:
        """``ready``; ``failed`` (never loaded); ``stale`` (a reload failed, the previous copy serves)."""
        if self.model is None:
            return "failed"
        return "stale" if self.error else "ready"


@dataclass(frozen=True)
class ModelState:
    name: str
    versions: Mapping[str, VersionState]  # ordered by version, lowest first
    active: str | None
    pinned: str | None  # set by activation; a settings pin is applied when there is none

    @property
    def active_model(self) -> ServedModel | None:
        return self.versions[self.active].model if self.active is not None else None


def _subdirectories(path: Path) -> list[Path]:
    # Hidden entries are bundles being written (calibration.bundle.save_bundle stages in ".<version>.*").
    if not path.is_dir():
        return []
    entries = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    bad = [p.name for p in entries if not is_valid_name(p.name)]
    if bad:
        log.warning("ignoring directories whose names are not valid model names or versions: %s", bad)
    return sorted((p for p in entries if is_valid_name(p.name)), key=lambda p: p.name)


def _checked(kind: str, value: str) -> str:
    try:
        return check_name(kind, value)
    except InvalidName as exc:
        raise BadName(str(exc)) from exc


def _choose_active(versions: Mapping[str, VersionState], pinned: str | None, name: str) -> str | None:
    if pinned is not None:
        state = versions.get(pinned)
        if state is not None and state.model is not None:
            return pinned
        log.warning(
            "model %s: pinned version %s is not loadable; serving the highest loadable version", name, pinned
        )
    loadable = [v for v, state in versions.items() if state.model is not None]
    return max(loadable, key=version_key) if loadable else None


class ModelRegistry:
    def __init__(
        self,
        models_dir: Path,
        loader: Loader,
        pinned_versions: Mapping[str, str] | None = None,
        default_model: str | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self._loader = loader
        self._settings_pins = dict(pinned_versions or {})
        self._default_setting = default_model
        # Without a setting: the only model, else the first present (see _choose_default), so a model
        # added later whose name sorts first does not take it over.
        self._implicit_default: str | None = None
        self._states: Mapping[str, ModelState] = MappingProxyType({})
        self._lock = threading.Lock()

    # Reads: lock-free, from the current immutable snapshot.

    def models(self) -> list[ModelState]:
        return list(self._states.values())

    def get(self, name: str) -> ModelState:
        _checked("model name", name)
        state = self._states.get(name)
        if state is None:
            raise ModelNotFound(f"expected one of the models {sorted(self._states)}, got {name!r}")
        return state

    @property
    def default_name(self) -> str | None:
        if self._default_setting is not None:
            return self._default_setting
        return self._implicit_default

    @property
    def default_reason(self) -> str:
        """Why the default model is the default (shown by /v1/models)."""
        if self._default_setting is not None:
            return "set by default_model in the settings"
        if self._implicit_default is None:
            return "no model loaded"
        if len(self._states) == 1:
            return "the only model (no default_model in the settings)"
        return (
            "the first model present: the earliest-created bundle among the loadable models (no "
            "default_model in the settings; set it to make the choice explicit)"
        )

    def _choose_default(self) -> None:
        """The loadable model whose bundles were created first (provenance.created): a model added later,
        whatever its name, never takes over, and being a function of what is on disk (not of load order),
        every worker and replica, restarted or not, picks the same one."""

        def first_created(state: ModelState) -> str:
            created = [v.model.bundle.manifest.provenance.created for v in state.versions.values() if v.model]
            return min(created)

        loadable = [state for state in self._states.values() if state.active_model is not None]
        if loadable:
            self._implicit_default = min(loadable, key=lambda st: (first_created(st), st.name)).name
        else:
            self._implicit_default = min(self._states) if self._states else None

    def serving(self, name: str | None = None) -> ServedModel:
        """The active model version of ``name`` (default: the default model)."""
        if name is None:
            name = self.default_name
            if name is None:
                raise NotReady("no model found in the models directory")
            if name not in self._states:
                raise NotReady(f"the default model {name!r} is not in the models directory")
        model = self.get(name).active_model
        if model is None:
            raise NotReady(f"model {name!r} has no loadable version")
        return model

    @property
    def ready(self) -> bool:
        try:
            self.serving()
        except RegistryError:
            return False
        return True

    # Writes: serialised, each ending in one swap of the snapshot.

    def load_all(self) -> None:
        with self._lock:
            states = {}
            for directory in _subdirectories(self.models_dir):
                states[directory.name] = self._load_model(directory.name, None)
            self._states = MappingProxyType(states)
            self._choose_default()

    def reload(self, name: str) -> ModelState:
        """Load every version of ``name`` from disk again (a new model directory is picked up too)."""
        _checked("model name", name)
        with self._lock:
            if name not in self._states and not (self.models_dir / name).is_dir():
                raise ModelNotFound(
                    f"expected one of the models {sorted(self._states)} or a directory of that name in "
                    f"the models directory, got {name!r}"
                )
            state = self._load_model(name, self._states.get(name))
            self._swap(state)
            self._choose_default()
            return state

    def activate(self, name: str, version: str) -> ModelState:
        """Serve ``version`` of ``name`` from now on (a pin kept across reloads)."""
        _checked("model name", name)
        _checked("version", version)
        with self._lock:
            state = self.get(name)
            target = state.versions.get(version)
            if target is None:
                raise VersionNotFound(
                    f"expected one of the versions {list(state.versions)} of {name}, got {version!r}"
                )
            if target.model is None:
                raise VersionNotLoadable(f"{name}/{version} failed to load: {target.error}")
            state = replace(state, active=version, pinned=version)
            self._swap(state)
            log.info("model %s: version %s activated", name, version)
            return state

    def _swap(self, state: ModelState) -> None:
        states = dict(self._states)
        states[state.name] = state
        self._states = MappingProxyType(dict(sorted(states.items())))

    def _load_model(self, name: str, previous: ModelState | None) -> ModelState:
        old_versions = previous.versions if previous is not None else {}
        versions: dict[str, VersionState] = {}
        for directory in sorted(_subdirectories(self.models_dir / name), key=lambda p: version_key(p.name)):
            versions[directory.name] = self._load_version(name, directory, old_versions.get(directory.name))
        gone = previous is not None and previous.active is not None and previous.active not in versions
        if gone and not any(v.model is not None for v in versions.values()):
            # The active version's directory is gone and nothing else loads: keep serving it.
            assert previous is not None and previous.active is not None
            kept = previous.versions[previous.active]
            why = f"{kept.directory}: expected a bundle directory, but it is gone (the copy loaded before serves)"
            log.warning("model %s: %s", name, why)
            versions[previous.active] = replace(kept, error=why, checked_at=time.time())
        pinned = previous.pinned if previous is not None else None
        effective_pin = pinned if pinned is not None else self._settings_pins.get(name)
        active = _choose_active(versions, effective_pin, name)
        if previous is not None and active != previous.active:
            log.info("model %s: active version %s -> %s", name, previous.active, active)
        return ModelState(name=name, versions=MappingProxyType(versions), active=active, pinned=pinned)

    def _load_version(self, name: str, directory: Path, previous: VersionState | None) -> VersionState:
        started = time.time()
        try:
            model = self._loader(directory)
        except BundleError as exc:
            error = str(exc)
        except Exception as exc:  # a loader bug must not take the other versions down
            log.exception("model %s: unexpected error loading %s", name, directory)
            error = f"{directory}: unexpected error: {exc}"
        else:
            log.info("model %s: version %s loaded (%s)", name, directory.name, ", ".join(model.providers))
            return VersionState(directory.name, directory, model, None, started)
        kept = previous.model if previous is not None else None
        log.warning(
            "model %s: version %s failed to load%s: %s",
            name,
            directory.name,
            " (the previous copy keeps serving)" if kept else "",
            error,
        )
        return VersionState(directory.name, directory, kept, error, started)
