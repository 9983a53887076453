"""Overlay rendering: colours from the palette (RGB -> BGR), blending only off background, outlines, HUD."""

from __future__ import annotations

import numpy as np
import pytest

from app.pipeline.overlay import HudInfo, OverlayRenderer, palette_lut, to_bgr8

RED, GREEN = (255, 0, 0), (0, 255, 0)


def scene(dtype=np.uint8, channels: int = 3):
    rng = np.random.default_rng(0)
    high = 65535 if dtype == np.uint16 else 255
    shape = (64, 64, channels) if channels > 1 else (64, 64)
    image = rng.integers(0, high, shape, dtype=dtype)
    labels = np.zeros((64, 64), np.uint8)
    labels[16:48, 16:48] = 1
    labels[4:10, 50:60] = 2
    return image, labels


def test_palette_lut_converts_rgb_to_bgr_and_marks_unknown_classes_white():
    lut = palette_lut([(0, 0, 0), RED])
    assert tuple(lut[1, 0]) == (0, 0, 255)
    assert tuple(lut[255, 0]) == (255, 255, 255)


def test_blend_only_where_not_background_and_inputs_untouched():
    image, labels = scene()
    before_image, before_labels = image.copy(), labels.copy()
    renderer = OverlayRenderer([(0, 0, 0), RED, GREEN], alpha=0.5, contours=False, hud=False)
    out = renderer.render(image, labels)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(image, before_image)
    np.testing.assert_array_equal(labels, before_labels)
    background = labels == 0
    np.testing.assert_array_equal(out[background], image[background])
    expected_red = (image[labels == 1].astype(np.float32) * 0.5 + np.array([0, 0, 255]) * 0.5)
    np.testing.assert_allclose(out[labels == 1], expected_red, atol=1)
    expected_green = (image[labels == 2].astype(np.float32) * 0.5 + np.array([0, 255, 0]) * 0.5)
    np.testing.assert_allclose(out[labels == 2], expected_green, atol=1)


def test_outlines_are_full_colour_on_the_inner_edge():
    image = np.zeros((64, 64), np.uint8)
    _, labels = scene()
    renderer = OverlayRenderer([(0, 0, 0), RED, GREEN], alpha=0.5, contours=True, contour_thickness=1, hud=False)
    out = renderer.render(image, labels)
    assert tuple(out[16, 30]) == (0, 0, 255)  # top edge of the red square: full colour
    assert tuple(out[30, 30]) == (0, 0, 128)  # interior: blended with black
    assert tuple(out[15, 30]) == (0, 0, 0)  # just outside: background untouched
    thick = OverlayRenderer([(0, 0, 0), RED, GREEN], contour_thickness=3, hud=False).render(image, labels)
    assert tuple(thick[18, 30]) == (0, 0, 255) and tuple(thick[19, 30]) == (0, 0, 128)


def test_gray_8_and_16_bit_frames_become_8_bit_bgr():
    gray8, labels = scene(channels=1)
    out8 = OverlayRenderer([(0, 0, 0), RED], contours=False, hud=False).render(gray8, labels * 0)
    np.testing.assert_array_equal(out8, np.repeat(gray8[:, :, None], 3, axis=2))
    ramp = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    shown = to_bgr8(ramp)
    assert shown.dtype == np.uint8 and shown.shape == (64, 64, 3)
    assert shown.min() == 0 and shown.max() == 255  # stretched by min/max
    assert to_bgr8(np.zeros((4, 4, 4), np.uint8)).shape == (4, 4, 3)


def test_hud_draws_in_the_corner_only_when_enabled():
    image, labels = scene()
    hud = HudInfo(fps=24.5, latency_ms=31.0, frames_dropped=3)
    plain = OverlayRenderer([(0, 0, 0), RED, GREEN], hud=False).render(image, labels, hud)
    with_hud = OverlayRenderer([(0, 0, 0), RED, GREEN], hud=True).render(image, labels, hud)
    changed = np.argwhere((plain != with_hud).any(axis=2))
    assert len(changed) > 0
    assert changed[:, 0].max() < 32  # the text box stays in the top rows
    assert "dropped 3" in hud.text()


def test_mismatched_sizes_and_bad_alpha_are_errors():
    image, labels = scene()
    renderer = OverlayRenderer([(0, 0, 0), RED])
    with pytest.raises(ValueError, match="differ in size"):
        renderer.render(image, labels[:32])
    with pytest.raises(ValueError, match="alpha"):
        OverlayRenderer([(0, 0, 0), RED], alpha=1.5)
