"""``blda serve``: the segmentation service under uvicorn. Heavy imports go inside the command.

Options become ``BLDA_*`` environment variables before uvicorn starts, so that every worker process
builds the same settings through :func:`service.app.app_from_environment`. With several workers,
Prometheus needs a shared directory for its multiprocess mode: unless ``PROMETHEUS_MULTIPROC_DIR`` is
set, a fresh one is created for this run (and removed afterwards); a given one is emptied of stale
metric files first.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

if TYPE_CHECKING:
    from service.settings import ServiceSettings

app = typer.Typer(no_args_is_help=True)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


class MultiprocDirError(ValueError):
    """A PROMETHEUS_MULTIPROC_DIR that cannot serve as the multiprocess directory."""


def prepare_multiprocess_dir(workers: int, environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """Prometheus' multiprocess directory, ready for a fresh run; returns it when created here (to remove).

    A directory given in PROMETHEUS_MULTIPROC_DIR is created if missing and emptied of the metric files a
    previous run left (``*.db``: stale values would otherwise add to the new ones). Without one, several
    workers get a fresh temporary directory; a single worker needs none.
    """
    given = environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        if path.exists() and not path.is_dir():
            raise MultiprocDirError(f"{MULTIPROC_ENV}: expected a directory, got a file: {path}")
        try:
            path.mkdir(parents=True, exist_ok=True)
            for stale in path.glob("*.db"):
                stale.unlink()
            # Every worker writes its metric files here: find out now rather than in each worker.
            with tempfile.NamedTemporaryFile(dir=path, prefix=".blda-probe-"):
                pass
        except OSError as exc:
            raise MultiprocDirError(
                f"{MULTIPROC_ENV}: expected a writable directory, got {path} ({exc.strerror or exc})"
            ) from None
        return None
    if workers <= 1:
        return None
    path = Path(tempfile.mkdtemp(prefix="blda-prometheus-"))
    environ[MULTIPROC_ENV] = str(path)
    return path


STATE_ENV = "BLDA_STATE_URL"


def prepare_state(workers: int, environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """Several workers share one SQLite state file unless BLDA_STATE_URL names a store; returns the
    directory created here (to remove). One worker keeps its state in memory."""
    if environ.get(STATE_ENV) or workers <= 1:
        return None
    path = Path(tempfile.mkdtemp(prefix="blda-state-"))
    from service.state import SqliteStore

    # Created (table, WAL mode) here, once, before the workers start: N workers creating it together race
    # for the exclusive lock of the WAL switch.
    SqliteStore(path / "state.db")
    environ[STATE_ENV] = f"sqlite:///{path / 'state.db'}"
    return path


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=64, help="Worker processes [default: BLDA_WORKERS, else one per core, at most 8]."
        ),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Directory of bundles <name>/<version>/ [default: settings, else ./models]"),
    ] = None,
    settings_file: Annotated[
        Path | None, typer.Option(help="TOML or JSON settings (BLDA_* environment variables override it).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve segmentation over HTTP (OpenAPI at /docs, demo page at /)."""
    from pydantic import ValidationError

    from service.settings import SETTINGS_FILE_ENV, SettingsFileError, load_settings

    if settings_file is not None:
        if not settings_file.is_file():
            raise _fail(f"--settings-file: expected an existing file, got {settings_file}")
        os.environ[SETTINGS_FILE_ENV] = str(settings_file.resolve())
    if models_dir is not None:
        os.environ["BLDA_MODELS_DIR"] = str(models_dir.resolve())
    if workers is not None:
        os.environ["BLDA_WORKERS"] = str(workers)
    try:
        settings = load_settings()
    except SettingsFileError as exc:
        raise _fail(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise _fail(f"setting {field}: {first['msg']}, got {first.get('input')!r}") from None
    workers = serve_workers(workers, settings)
    # Every worker builds its settings from the environment: they must agree on how many there are.
    os.environ["BLDA_WORKERS"] = str(workers)
    if not settings.models_dir.is_dir():
        raise _fail(
            f"--models-dir: expected a directory of bundles, got {settings.models_dir} (not a directory)"
        )

    import uvicorn

    from service.http import uvicorn_options

    try:
        multiproc_dir = prepare_multiprocess_dir(workers, os.environ)
    except MultiprocDirError as exc:
        raise _fail(str(exc)) from None
    state_dir = prepare_state(workers, os.environ)
    try:
        uvicorn.run(
            "service.app:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            # JSON logs: the app configures logging in each worker and writes its own access lines.
            access_log=access_log and settings.log_format == "text",
            log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
            **uvicorn_options(settings),
        )
    finally:
        for made in (multiproc_dir, state_dir):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)


def serve_workers(option: int | None, settings: ServiceSettings) -> int:
    """--workers, else the settings' workers when set (BLDA_WORKERS, the settings file), else one per
    core (service.settings.auto_workers)."""
    from service.settings import auto_workers, available_cores

    if option is not None:
        return option
    if "workers" in settings.model_fields_set:
        return settings.workers
    return auto_workers(available_cores())


@app.command("predict")
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and folders (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Folder of the outputs: <relative path>/<stem>.png|.json")],
    models_dir: Annotated[
        Path | None,
        typer.Option(help="Directory of bundles <name>/<version>/ [default: settings, else ./models]"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="NAME or NAME:VERSION [default: the service's default model, its active version]"),
    ] = None,
    calibrate: Annotated[
        bool | None, typer.Option("--calibrate/--no-calibrate", help="[default: from the model's manifest]")
    ] = None,
    tau: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="[default: from the manifest]")] = None,
    calibrator: Annotated[
        str | None,
        typer.Option(
            help="One of the bundle's calibrators (blda inspect lists them) [default: the manifest's]"
        ),
    ] = None,
    format: Annotated[
        Literal["png", "json"], typer.Option(help="png: palette mask; json: as the API")
    ] = "png",
    overlay: Annotated[
        bool, typer.Option(help="Also write <stem>.overlay.png: the mask over the image.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs (default: skip them).")] = False,
    jobs: Annotated[int | None, typer.Option(min=1, help="Images at once [default: the cores].")] = None,
    settings_file: Annotated[
        Path | None, typer.Option(help="TOML or JSON service settings (decision_scale, limits, ...).")
    ] = None,
) -> None:
    """Segment images in-process through the service's pipeline (the served masks, byte for byte)."""
    from pydantic import ValidationError

    from service.pipeline import CalibratorError, options_from, resolve_calibration
    from service.predict import PredictError, choose_model, collect_inputs, plan_outputs, predict_all
    from service.settings import SettingsFileError, available_cores, load_settings

    overrides: dict[str, object] = {} if models_dir is None else {"models_dir": models_dir}
    try:
        settings = load_settings(settings_file, **overrides)
    except (SettingsFileError, ValidationError) as exc:
        raise _fail(str(exc)) from None
    workers = jobs or available_cores()
    try:
        served = choose_model(settings, model, threads=max(1, available_cores() // workers))
    except PredictError as exc:
        raise _fail(str(exc)) from None
    if calibrate and not served.has_calibration and calibrator is None:
        raise _fail(f"--calibrate: {served.name}/{served.version} has no calibration tables")
    try:
        choice = resolve_calibration(served, calibrate, calibrator, tau)
    except CalibratorError as exc:
        raise _fail(f"--calibrator: {exc}") from None
    use_calibration, tau_used, chosen = choice.calibrate, choice.tau, choice.calibrator
    # The API's JSON head (service.routes.segment), so that a predicted JSON is the served one.
    head = {"model": served.name, "version": served.version, **choice.head()}
    opts = options_from(settings, use_calibration, tau_used, format, json_head=head, calibrator=chosen)
    found, problems = collect_inputs(inputs)
    planned, clashes = plan_outputs(found, out, format, overlay)
    problems += clashes
    typer.echo(
        f"{served.name}/{served.version}, calibrator: {chosen}"
        + (f" (tau {tau_used:g})" if use_calibration and choice.uses_tau else "")
        + f", {len(planned)} image(s), {workers} at once",
        err=True,
    )
    skipped = 0
    with typer.progressbar(length=len(planned), label="segmenting", file=sys.stderr) as bar:

        def done(outcome: object) -> None:
            bar.update(1)

        outcomes = predict_all(served, planned, opts, overwrite, workers, done)
    for outcome in outcomes:
        if outcome.error is not None:
            problems.append((outcome.source, outcome.error))
        elif outcome.skipped is not None:
            skipped += 1
            typer.echo(f"skipped: {outcome.source}: {outcome.skipped}", err=True)
    for source, why in problems:
        typer.echo(f"error: {source}: {why}", err=True)
    written = sum(1 for o in outcomes if o.error is None and o.skipped is None)
    typer.echo(f"{written} written, {skipped} skipped, {len(problems)} failed -> {out}", err=True)
    if problems:
        raise typer.Exit(code=1)
