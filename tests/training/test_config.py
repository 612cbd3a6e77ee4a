"""Training config: presets, file + --set overrides with type checking, errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ARMS, ConfigError, from_dict, load_config, parse_overrides, to_dict


def test_presets_differ_only_where_the_arms_do() -> None:
    so, st, bl = (load_config(a) for a in ("source-only", "self-training", "blda"))
    assert not so.self_training.enabled and not so.blda.enabled
    assert st.self_training.enabled and not st.blda.enabled
    assert bl.self_training.enabled and bl.blda.enabled
    assert so.optim == st.optim == bl.optim and so.data == st.data == bl.data
    assert bl.blda.t == 0.1 and bl.blda.eps == 0.01 and bl.blda.components == 5
    assert set(ARMS) == {"source-only", "self-training", "blda"}


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "blda",
        overrides=["optim.lr=0.01", "blda.cdf_weight=0.2", "blda.correct_source=false", "optim.iterations=7"],
        seed=3,
    )
    assert cfg.optim.lr == 0.01 and cfg.blda.cdf_weight == 0.2
    assert cfg.blda.correct_source is False and cfg.optim.iterations == 7 and cfg.seed == 3


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("optim.lrr=1", "optim.lrr: unknown key"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("optim.iterations=1.5", "optim.iterations: expected an integer"),
        ("blda.enabled=maybe", "blda.enabled: expected a boolean"),
        ("optim=3", "optim: expected a table"),
        ("nonsense", "expected key.sub=value"),
        ("optim.loss_resolution=half", "optim.loss_resolution: expected one of"),
        ("blda.eps=0.7", "blda.eps: expected in (0, 0.5)"),
    ],
)
def test_bad_overrides_name_the_key(item: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config("blda", overrides=[item])
    assert needle in str(err.value)


def test_unknown_arm_lists_the_options() -> None:
    with pytest.raises(ConfigError, match="expected one of"):
        load_config("dacs")


def test_blda_requires_self_training() -> None:
    with pytest.raises(ConfigError, match=r"self_training\.enabled"):
        load_config("source-only", overrides=["blda.enabled=true"])


def test_toml_and_json_files_then_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("seed = 5\n[optim]\nlr = 0.5\niterations = 9\n[blda]\nt = 0.2\n")
    cfg = load_config("blda", toml, overrides=["optim.lr=0.25"])
    assert (cfg.seed, cfg.optim.lr, cfg.optim.iterations, cfg.blda.t) == (5, 0.25, 9, 0.2)
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"optim": {"iterations": "x"}}))
    with pytest.raises(ConfigError, match=r"run.json: optim.iterations: expected an integer"):
        load_config("blda", js)
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: expected valid TOML"):
        load_config("blda", bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config("blda", tmp_path / "missing.toml")


def test_dict_round_trip() -> None:
    cfg = load_config("blda", overrides=["blda.components=3", "data.crop_height=64"])
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_parse_overrides_nests() -> None:
    assert parse_overrides(["a.b=1", "a.c=x=y"]) == {"a": {"b": "1", "c": "x=y"}}
