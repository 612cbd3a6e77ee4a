"""`blda train`: one command per arm (see training/config.py). Heavy imports go inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def run_folder_problem(out: Path, resume: bool) -> str | None:
    """Why `out` cannot take a new run: a non-empty folder would get a second run appended to its
    metrics.jsonl and its checkpoint overwritten. --resume continues the run that is there."""
    if resume or not out.exists():
        return None
    if not out.is_dir():
        return f"--out: expected a run folder, got a file: {out}"
    entries = sorted(p.name for p in out.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        return (
            f"--out: expected a new or empty run folder, got {out} holding {shown} "
            "(--resume continues the run there; or choose another --out)"
        )
    return None


@app.command("train")
def train(
    arm: Annotated[str, typer.Option(help="source-only | self-training | blda")],
    data: Annotated[
        Path,
        typer.Option(
            help="Data root: data.source in data.source_format (default source/, GTA5), data.target in "
            "data.target_format (default target/, Cityscapes); formats gta5|synthia|cityscapes|folder."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoint.pt, metrics.jsonl, eval.json).")],
    config: Annotated[Path | None, typer.Option(help="TOML or JSON file of settings.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override: section.key=value (repeatable).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from out/checkpoint.pt if present.")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads per process.")] = 1,
    device: Annotated[
        str,
        typer.Option(help="auto (CUDA when available) | cpu | cuda; under torchrun, the local rank's GPU."),
    ] = "auto",
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (sets optim.amp=true).")] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the datasets decoded and rescaled here (when the scale is fixed); reused."),
    ] = None,
) -> None:
    """Train one arm; under `torchrun --nproc_per_node N` the processes train data-parallel."""
    from training.config import ConfigError, load_config

    overrides = [*(set_ or ()), *(["optim.amp=true"] if amp else [])]
    try:
        cfg = load_config(arm, config, overrides, seed)
    except ConfigError as err:
        _fail(str(err))
        return
    problem = run_folder_problem(out, resume)
    if problem is not None:
        _fail(problem)
    from training.distributed import DEVICES

    if device not in DEVICES:
        _fail(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    import hashlib
    import json

    import torch

    from training.datasets import class_names, open_domains
    from training.uda.loop import Domains, run_training

    torch.set_num_threads(max(1, threads))
    try:
        sets = open_domains(data, cfg.data)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
        return
    # A folder dataset declares its own classes: the head must have as many (the loss would index past it).
    for key, domain, fmt in (
        ("source", "source", cfg.data.source_format),
        ("target_train", "target", cfg.data.target_format),
    ):
        names = class_names(sets[key])
        if names is not None and len(names) != cfg.model.num_classes:
            _fail(
                f"model.num_classes: expected {len(names)}, the classes of the {domain} data ({fmt}), "
                f"got {cfg.model.num_classes}"
            )
    if cfg.data.eval_split == "tuning" and len(sets["target_tuning"]) == 0:
        _fail("data.eval_split: expected a tuning split, got data.tuning_fraction = 0")
    evaluation = sets["target_tuning"] if cfg.data.eval_split == "tuning" else sets["target_val"]
    domains = Domains(sets["source"], sets["target_train"], evaluation)
    d = cfg.data
    if cache_dir is not None and d.scale_min == d.scale_max == d.eval_scale:
        from training.datasets import prescaled

        # The key follows the data: its resolved path and the time its files were last (re)written, so a
        # regenerated benchmark never meets a stale cache.
        stamp = max((p.stat().st_mtime_ns for p in data.resolve().rglob("*") if p.is_file()), default=0)
        key = hashlib.sha1(f"{data.resolve()}:{stamp}".encode()).hexdigest()[:10]
        sets_named = {
            "source": domains.source,
            f"target-train-{d.tuning_fraction}": domains.target_train,
            f"target-{d.eval_split}-{d.tuning_fraction}": domains.target_val,
        }
        cached = [
            prescaled(ds, d.scale_min, cache_dir / f"{key}-{name}-{d.scale_min}-{len(ds)}")
            for name, ds in sets_named.items()
        ]
        domains = Domains(cached[0], cached[1], cached[2], prescale=d.scale_min)
    try:
        result = run_training(cfg, domains, out, resume=resume, device=device)
    except (FileNotFoundError, ValueError) as err:  # a bad init checkpoint, a bad resume file
        _fail(str(err))
        return
    if "miou" in result:
        summary = {k: result[k] for k in ("miou", "iou_std", "train_seconds", "iteration")}
        typer.echo(json.dumps(summary))
