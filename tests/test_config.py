from __future__ import annotations

import argparse
import dataclasses

import pytest

from app.cli import add_config_arguments, config_from_args
from app.config import (
    Config,
    ConfigError,
    load_config,
    parse_override,
    replace,
)


def test_defaults_load_from_repository_file(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    assert isinstance(cfg, Config)
    assert cfg.source.uri == "synthetic"
    assert cfg.train.aux_weights == (0.4, 0.4, 1.0)
    assert isinstance(cfg.synth.cell_radius_px, tuple)


def test_yaml_covers_every_field(repo_root):
    """Every dataclass field appears in config.yaml, so users see every default they may change."""
    import yaml

    data = yaml.safe_load((repo_root / "config.yaml").read_text())
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(section.default_factory())}
        assert set(data[section.name]) == keys, section.name


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.backend = "onnx"  # type: ignore[misc]


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backnd: onnx\n")
    with pytest.raises(ConfigError, match="did you mean 'model.backend'"):
        load_config(path)


def test_unknown_section_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'pipeline'"):
        load_config(overrides=["pipline.queue_size=3"])


def test_wrong_type_names_key_and_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline:\n  queue_size: lots\n")
    with pytest.raises(ConfigError, match=r"pipeline\.queue_size: expected int"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"overlay\.contours: expected bool"):
        load_config(overrides=["overlay.contours=7"])
    with pytest.raises(ConfigError, match="list of 3 values"):
        load_config(overrides=["train.aux_weights=[1, 2]"])
    with pytest.raises(ConfigError, match=r"synth\.cell_radius_px: expected a list \(tuple\[float, float\]\)"):
        load_config(overrides=["synth.cell_radius_px=0.1"])
    with pytest.raises(ConfigError, match=r"model\.backend: expected str, got bool"):
        load_config(overrides=["model.backend=true"])


def test_camera_index_is_kept_as_text(tmp_path):
    """``uri: 0`` (camera 0, as config.yaml documents) is read as YAML int; a str field keeps its text."""
    path = tmp_path / "c.yaml"
    path.write_text("source:\n  uri: 0\n")
    assert load_config(path).source.uri == "0"
    assert load_config(overrides=["source.uri=1"]).source.uri == "1"


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(overrides=["overlay.alpha=1"]).overlay.alpha == 1.0
    with pytest.raises(ConfigError):
        load_config(overrides=["pipeline.queue_size=true"])


def test_override_parsing():
    assert parse_override("model.backend=onnx") == (["model", "backend"], "onnx")
    assert load_config(overrides=["train.lr=1e-4"]).train.lr == 1e-4
    assert parse_override("benchmark.sizes=[256, 512]") == (["benchmark", "sizes"], [256, 512])
    assert parse_override("output.video=") == (["output", "video"], "")
    for bad in ("model.backend", "backend=onnx", "model.=x"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_overrides_apply_in_order_and_types_are_coerced():
    cfg = load_config(overrides=["pipeline.queue_size=3", "pipeline.queue_size=4", "benchmark.sizes=[64]"])
    assert cfg.pipeline.queue_size == 4
    assert cfg.benchmark.sizes == (64,)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_cli_arguments_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("overlay:\n  alpha: 0.25\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--set", "overlay.hud=false", "--set", "model.backend=onnx"])
    cfg = config_from_args(args)
    assert (cfg.overlay.alpha, cfg.overlay.hud, cfg.model.backend) == (0.25, False, "onnx")
    assert cfg.pipeline == load_config().pipeline


def test_replace_type_checks_and_keeps_the_original():
    cfg = load_config()
    changed = replace(cfg, output={"gif": "x.gif"}, pipeline={"max_frames": 5})
    assert (changed.output.gif, changed.pipeline.max_frames) == ("x.gif", 5)
    assert cfg.output.gif == ""
    with pytest.raises(ConfigError):
        replace(cfg, pipeline={"max_frames": "many"})
    with pytest.raises(ConfigError, match="did you mean"):
        replace(cfg, pipeline={"max_frame": 5})


@pytest.mark.parametrize("override, message", [
    ("pipeline.batch_size=0", "pipeline.batch_size must be >= 1"),
    ("pipeline.queue_size=-1", "pipeline.queue_size must be >= 1"),
    ("pipeline.max_frames=-1", "pipeline.max_frames must be >= 0"),
    ("overlay.alpha=5", "overlay.alpha must be between 0 and 1"),
    ("preprocess.input_size=-5", "preprocess.input_size must be >= 0"),
    ("model.precision=fp8", "model.precision must be one of"),
    ("optics.wavelength_nm=-633", "optics.wavelength_nm must be a number > 0"),
    ("objects.min_area_px=0", "objects.min_area_px must be >= 1"),
])
def test_out_of_range_values_fail_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_out_of_range_flags_fail_before_anything_runs(tmp_path, capsys):
    from app import live

    assert live.main(["--source", "synthetic", "--no-display", "--max-frames", "-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["app.live: error: pipeline.max_frames must be >= 0 (0 = no limit), got -1"]
