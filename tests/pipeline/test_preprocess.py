from __future__ import annotations

import numpy as np
import pytest

from app.config import load_config, replace
from app.pipeline.preprocess import (
    Clahe,
    FirstNMeanBackground,
    Mog2Background,
    PreprocessError,
    Preprocessor,
    PreprocessSettings,
    RunningAverageBackground,
    convert_channels,
    make_background,
    normalize,
    recipe,
    settings_from,
)

RNG = np.random.default_rng(0)


def test_convert_channels_gray_and_colour():
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue
    gray = convert_channels(bgr, 1)
    assert gray.shape == (4, 5) and gray.dtype == np.uint8
    rgb = convert_channels(bgr, 3)
    assert rgb[0, 0].tolist() == [0, 0, 200]
    assert convert_channels(np.ones((4, 5), np.uint16), 3).shape == (4, 5, 3)
    with pytest.raises(PreprocessError):
        convert_channels(np.zeros((4, 5, 2), np.uint8), 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_clahe_spreads_a_narrow_histogram(dtype):
    top = np.iinfo(dtype).max
    image = (top * (0.45 + 0.1 * RNG.random((64, 64)))).astype(dtype)
    out = Clahe(clip_limit=4.0, tile_grid=4)(image)
    assert out.dtype == dtype and out.shape == image.shape
    assert out.std() > 1.5 * image.std()
    with pytest.raises(PreprocessError):
        Clahe()(image.astype(np.float32))


def test_first_n_mean_freezes_after_n_frames():
    background = FirstNMeanBackground(2)
    a, b, c = (np.full((3, 3), v, np.float32) for v in (1.0, 3.0, 10.0))
    np.testing.assert_allclose(background(a), 0.0)
    np.testing.assert_allclose(background(b), 1.0)  # mean of first two = 2
    np.testing.assert_allclose(background(c), 8.0)  # estimate frozen at 2


def test_first_n_mean_fit_on_a_sequence():
    frames = [np.full((2, 2), v, np.float32) for v in (0.0, 2.0, 100.0)]
    background = FirstNMeanBackground(2).fit(frames)
    np.testing.assert_allclose(background(np.full((2, 2), 5.0, np.float32)), 4.0)


def test_running_average_tracks_slow_changes():
    background = RunningAverageBackground(alpha=0.5)
    np.testing.assert_allclose(background(np.zeros((2, 2), np.float32)), 0.0)
    np.testing.assert_allclose(background(np.ones((2, 2), np.float32)), 1.0)
    np.testing.assert_allclose(background(np.ones((2, 2), np.float32)), 0.5)


def test_mog2_removes_a_static_scene():
    background = Mog2Background()
    scene = RNG.random((32, 32)).astype(np.float32)
    for _ in range(20):
        out = background(scene)
    assert np.abs(out).mean() < 0.05 * scene.mean()


def test_unknown_background_lists_valid_names():
    with pytest.raises(PreprocessError, match="first_n_mean"):
        make_background("median")


def test_normalisation_modes():
    image = RNG.random((16, 16)).astype(np.float32) * 3 + 1
    out = normalize(image, {"mode": "standardize"})
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    rgb = np.ones((2, 2, 3), np.float32)
    out = normalize(rgb, {"mode": "mean_std", "mean": [0.5, 0.5, 1.0], "std": [0.5, 0.25, 1.0]})
    assert out[0, 0].tolist() == [1.0, 2.0, 0.0]
    with pytest.raises(PreprocessError):
        normalize(image, {"mode": "zscore"})


def test_preprocessor_output_contract():
    settings = PreprocessSettings(in_channels=1, clahe=True, background="running_average", input_size=32)
    frame = (RNG.random((48, 40, 3)) * 255).astype(np.uint8)
    out = Preprocessor(settings)(frame)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    colour = Preprocessor(PreprocessSettings(in_channels=3))(frame)
    assert colour.shape == (3, 48, 40)
    assert abs(float(colour.mean())) < 1e-4


def test_checkpoint_recipe_wins_only_when_asked():
    cfg = replace(load_config(), preprocess={"clahe": False, "background": "none"})
    recorded = recipe(PreprocessSettings(clahe=True, background="first_n_mean", background_frames=4))
    from_ckpt = settings_from(cfg.preprocess, 1, {"mode": "standardize"}, recorded)
    assert (from_ckpt.clahe, from_ckpt.background, from_ckpt.background_frames) == (True, "first_n_mean", 4)
    cfg_only = replace(cfg, preprocess={"from_checkpoint": False})
    own = settings_from(cfg_only.preprocess, 3, {"mode": "none"}, recorded)
    assert (own.clahe, own.background, own.in_channels) == (False, "none", 3)
    assert own.normalization_dict == {"mode": "none"}


def test_a_config_choice_the_checkpoint_overrides_is_named_in_a_warning(caplog):
    recorded = recipe(PreprocessSettings(clahe=False, background="none"))
    asked = replace(load_config(), preprocess={"background": "mog2", "clahe": True})
    settings = settings_from(asked.preprocess, 1, {"mode": "standardize"}, recorded)
    assert (settings.background, settings.clahe) == ("none", False)
    assert "background=mog2 (checkpoint: none)" in caplog.text and "clahe=True" in caplog.text
    assert "from_checkpoint=false" in caplog.text
    caplog.clear()
    trained_with_clahe = recipe(PreprocessSettings(clahe=True))
    settings_from(load_config().preprocess, 1, {"mode": "standardize"}, trained_with_clahe)
    assert caplog.text == ""  # config defaults are no choice of the user's
