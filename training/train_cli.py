"""`blda train`: one command per arm (see training/config.py). Heavy imports go inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command("train")
def train(
    arm: Annotated[str, typer.Option(help="source-only | self-training | blda")],
    data: Annotated[Path, typer.Option(help="Data folder (source/ GTA5 layout, target/ Cityscapes layout).")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoint.pt, metrics.jsonl, eval.json).")],
    config: Annotated[Path | None, typer.Option(help="TOML or JSON file of settings.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override: section.key=value (repeatable).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt if present.")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads per process.")] = 1,
) -> None:
    """Train one arm; under `torchrun --nproc_per_node N` the processes train data-parallel."""
    from training.config import ConfigError, load_config

    try:
        cfg = load_config(arm, config, set_ or (), seed)
    except ConfigError as err:
        _fail(str(err))
        return
    import json

    import torch

    from training.datasets import open_domains
    from training.loop import Domains, run_training

    torch.set_num_threads(max(1, threads))
    try:
        sets = open_domains(data, cfg.data.source, cfg.data.target, cfg.data.tuning_fraction)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
        return
    domains = Domains(sets["source"], sets["target_train"], sets["target_val"])
    result = run_training(cfg, domains, out, resume=resume)
    if "miou" in result:
        summary = {k: result[k] for k in ("miou", "class_iou_std", "train_seconds", "iteration")}
        typer.echo(json.dumps(summary))
