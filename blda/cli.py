"""Root of the `blda` command.

Each package contributes a light `typer.Typer` whose modules import nothing heavy at import time
(torch, onnxruntime and uvicorn are imported inside the commands), so a serving install without
torch still gets a working `blda`.
"""

from __future__ import annotations

import typer

from calibration.cli import app as calibrate_app
from service.bundle_cli import app as bundle_app
from service.cli import app as service_app
from training.cli import app as training_app
from training.data.cli import app as data_app
from training.train_cli import app as train_app

app = typer.Typer(
    name="blda",
    help="Balanced logit-distribution calibration for domain-adaptive semantic segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(calibrate_app, name="calibrate", help="Fit and apply calibration tables on logits files.")
app.add_typer(
    bundle_app,
    name="bundle",
    help="Bundle any ONNX segmentation model (create), check it (validate, inspect).",
)
app.add_typer(data_app)
app.add_typer(train_app)
app.add_typer(training_app)
app.add_typer(service_app)


def main() -> None:
    app()
