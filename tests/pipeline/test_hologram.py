"""The hologram stage: carrier search, sideband demodulation, torch parity and qpretrieve parity."""

from __future__ import annotations

import dataclasses
import math
import warnings

import cv2
import numpy as np
import pytest

from app.config import SynthConfig
from app.pipeline import hologram as H
from app.synthesis import make_sequence
from tests.conftest import SHARED_DATA

HL60 = SHARED_DATA / "real" / "hl60"


def _sequence(**changes):
    cfg = SynthConfig(size=160, frames=2, seed=5, generator="propagated", num_cells=4, defocus_px=0.0)
    return make_sequence(dataclasses.replace(cfg, **changes))


PERIODS_AND_ANGLES = [(2.2, 45.0), (3.0, 10.0), (4.0, 135.0), (5.0, 260.0), (8.0, 300.0), (10.0, 90.0)]


def _angle_error(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("period, angle", PERIODS_AND_ANGLES)
def test_carrier_recovers_configured_period_and_angle(period: float, angle: float) -> None:
    """Sub-bin accuracy: the fringes alone (no objects, dust or aberration), 0.15 % of the period."""
    seq = _sequence(fringe_period_px=period, fringe_angle_deg=angle, fringe_visibility=0.5, aberration_rad=0.0,
                    num_cells=0, num_dust_rings=0, speckle_rad=0.0, parasitic_fringes=0)
    carrier = H.find_carrier(seq.frame(0).image)
    expected = H.Carrier.from_period(period, angle).canonical()
    assert carrier.period_px == pytest.approx(period, rel=1.5e-3)
    assert _angle_error(carrier.angle_deg, expected.angle_deg) < 0.2


@pytest.mark.parametrize("period, angle", PERIODS_AND_ANGLES)
def test_carrier_with_objects_and_coherent_noise(period: float, angle: float) -> None:
    """Cells, dust and speckle broaden the sideband peak: still within one frequency bin."""
    seq = _sequence(fringe_period_px=period, fringe_angle_deg=angle, fringe_visibility=0.4, aberration_rad=0.0)
    carrier = H.find_carrier(seq.frame(0).image)
    expected = H.Carrier.from_period(period, angle).canonical()
    # Either sideband of the pair is the carrier (they swap at fx = 0).
    error = min(math.hypot(carrier.fy - sign * expected.fy, carrier.fx - sign * expected.fx) for sign in (1, -1))
    assert error < 1.0 / 160


def test_carrier_across_randomised_holograms() -> None:
    """Speckle, parasitic fringes, dust and low visibility never pull the search off the carrier."""
    for seed in range(40, 52):
        seq = make_sequence(SynthConfig(size=160, frames=1, seed=seed, randomize=True))
        meta = seq.meta()
        expected = H.Carrier.from_period(meta["fringe_period_px"], meta["fringe_angle_deg"]).canonical()
        found = H.find_carrier(seq.frame(0).image)
        # Aberrations of up to 6 rad bend the fringes: the peak is their mean local frequency.
        error = math.hypot(found.fy - expected.fy, found.fx - expected.fx)
        assert error < 0.06 * expected.frequency, (seed, meta["fringe_period_px"], error)


def test_no_fringes_is_a_clear_error() -> None:
    flat = np.random.default_rng(0).normal(100, 2, (64, 64)).astype(np.float32)
    with pytest.raises(H.HologramError, match="no off-axis carrier"):
        H.find_carrier(flat)


def test_demodulated_phase_matches_the_objects_phase() -> None:
    """In focus, with the background hologram: the retrieved phase is the objects' own phase (± sign)."""
    seq = _sequence(fringe_period_px=3.5, fringe_angle_deg=30.0, noise_std=0.005, speckle_rad=0.0,
                    num_dust_rings=2, aberration_rad=3.0, bead_fraction=0.0, organism_fraction=0.0)
    frame = seq.frame(0)
    field = H.OffAxisDemodulator(background=seq.background()).full_field(frame.image)
    truth = cv2.GaussianBlur(frame.cell_phase, (0, 0), 1.5)  # the sideband filter limits resolution
    inner = cv2.erode((frame.mask == 1).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    assert inner.sum() > 100
    errors = [np.angle(field * np.exp(-1j * sign * truth))[inner] for sign in (1, -1)]
    rms = min(float(np.sqrt(np.mean((e - np.median(e)) ** 2))) for e in errors)
    assert rms < 0.15


def test_background_division_cancels_dust_and_aberration() -> None:
    seq = _sequence(num_cells=0, num_dust_rings=4, dust_strength=0.3, aberration_rad=5.0, noise_std=0.005,
                    parasitic_fringes=0)
    frame = seq.frame(0).image
    inner = (slice(6, -6), slice(6, -6))  # the FFT's periodic wrap spoils the outermost samples
    with_background = np.angle(H.OffAxisDemodulator(background=seq.background()).field(frame))[inner]
    without = np.angle(H.OffAxisDemodulator().field(frame))[inner]
    assert with_background.std() < 0.1
    assert without.std() > 2 * with_background.std()


def test_tilt_is_removed_without_background() -> None:
    """A carrier fixed 0.4 bin off (what a configured carrier on another microscope leaves) is a phase
    ramp of 0.8π across the field: the reference fitted to the first frame takes it out."""
    seq = _sequence(num_cells=0, num_dust_rings=0, aberration_rad=0.0, speckle_rad=0.0, noise_std=0.002,
                    parasitic_fringes=0)
    image = seq.frame(0).image.astype(np.float32)
    carrier = H.Carrier.from_period(4.0, 45.0)
    shifted = H.Carrier(carrier.fy + 0.4 / 160, carrier.fx)
    raw = H.sideband_field(image, H.plan_sideband(image.shape, shifted))
    assert np.angle(raw * np.conj(raw.mean())).std() > 0.5
    field = H.OffAxisDemodulator(carrier=shifted).field(image)
    assert np.angle(field).std() < 0.15


def test_frame_size_change_restarts_the_plan() -> None:
    small, large = _sequence(size=128), _sequence(size=192, fringe_period_px=6.0)
    demodulator = H.OffAxisDemodulator()
    assert demodulator.channels(small.frame(0).image).shape == (128, 128, 3)
    first = demodulator.carrier
    assert demodulator.channels(large.frame(0).image).shape == (192, 192, 3)
    assert demodulator.plan.shape == (192, 192)
    assert demodulator.carrier.period_px == pytest.approx(6.0, rel=0.02)
    assert first.period_px == pytest.approx(4.0, rel=0.02)


def test_background_of_another_size_is_an_error() -> None:
    demodulator = H.OffAxisDemodulator(background=np.zeros((100, 100), np.float32))
    with pytest.raises(H.HologramError, match="background hologram is 100×100"):
        demodulator.field(_sequence().frame(0).image)


def test_unreadable_background_file(tmp_path) -> None:
    bad = tmp_path / "bg.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(H.HologramError, match="cannot read background hologram"):
        H.load_background_hologram(bad)
    with pytest.raises(H.HologramError, match="not found"):
        H.load_background_hologram(tmp_path / "missing.png")


@pytest.mark.parametrize("with_background", [False, True])
def test_torch_and_numpy_demodulation_agree(with_background: bool) -> None:
    torch = pytest.importorskip("torch")
    seq = make_sequence(SynthConfig(size=144, frames=2, seed=9, randomize=True))
    background = seq.background() if with_background else None
    frames = np.stack([seq.frame(i).image for i in range(2)]).astype(np.float32)
    numpy_path = H.OffAxisDemodulator(background=background)
    expected = np.stack([numpy_path.channels(frame) for frame in frames]).transpose(0, 3, 1, 2)
    torch_path = H.TorchDemodulator(H.OffAxisDemodulator(background=background), device="cpu")
    got = torch_path.channels(torch.from_numpy(frames)).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)


def _rms_phase_difference(ours: np.ndarray, theirs_conjugated: np.ndarray, where: np.ndarray) -> float:
    """RMS (rad) of the phase of ours × theirs_conjugated over ``where``, a common piston removed first
    (on the mean phasor, so a difference near ±π does not wrap)."""
    product = (ours * theirs_conjugated)[where]
    product *= np.conj(product.mean()) / abs(product.mean())
    return float(np.sqrt(np.mean(np.angle(product) ** 2)))


def _qpretrieve_ratio(qpretrieve, hologram: np.ndarray, background: np.ndarray) -> np.ndarray:
    holo, back = qpretrieve.OffAxisHologram(hologram), qpretrieve.OffAxisHologram(background)
    holo.run_pipeline(filter_name="smooth disk", filter_size=0.5)
    back.run_pipeline(filter_name="smooth disk", filter_size=0.5, sideband_freq=holo.pipeline_kws["sideband_freq"])
    return np.squeeze(holo.field) / np.squeeze(back.field)


def test_phase_agrees_with_qpretrieve_on_a_synthetic_hologram() -> None:
    """Runs everywhere (the HL60 test below needs ../shared): a 12-bit propagated hologram and its background."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpretrieve = pytest.importorskip("qpretrieve")
    seq = _sequence(size=192, fringe_period_px=4.5, fringe_angle_deg=35.0, bit_depth=12, bead_fraction=0.0,
                    organism_fraction=0.0, num_cells=3)
    frame, background = seq.frame(0), seq.background()
    theirs = _qpretrieve_ratio(qpretrieve, frame.image, background)
    ours = H.OffAxisDemodulator(background=background, background_fit=False).full_field(frame.image)
    inside = cv2.erode((frame.mask == 1).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert inside.sum() > 200
    # Both pick the sideband at fx < 0 here or the other: compare with the matching sign.
    assert min(_rms_phase_difference(ours, sign(theirs), inside) for sign in (np.conj, np.positive)) < 0.05


@pytest.mark.skipif(not (HL60 / "hologram.png").is_file(), reason="needs ../shared/data/real/hl60 beside the checkout")
def test_phase_agrees_with_qpretrieve_on_hl60() -> None:
    """The field's reference library, same sideband and filter (smooth disk, 1/2 the sideband distance)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qpretrieve = pytest.importorskip("qpretrieve")
    hologram = cv2.imread(str(HL60 / "hologram.png"), cv2.IMREAD_GRAYSCALE)
    background = cv2.imread(str(HL60 / "background.png"), cv2.IMREAD_GRAYSCALE)
    inside = cv2.imread(str(HL60 / "mask.png"), cv2.IMREAD_UNCHANGED) == 1
    # The background with the hologram's sideband, as qpretrieve users do (its own search can land a bin away).
    theirs = _qpretrieve_ratio(qpretrieve, hologram, background)
    ours = H.OffAxisDemodulator(filter_name="smooth_disk", filter_size=0.5, background=background,
                                background_fit=False).full_field(hologram)
    # qpretrieve takes the other sideband of the pair: its phase has the opposite sign.
    rms = _rms_phase_difference(ours, theirs, inside)
    assert rms < 0.05, rms
    assert abs(np.median(np.angle(ours)[inside])) > 1.0  # the cell is there: a phase of about 2 rad


@pytest.mark.parametrize("name, size, message", [("gauss", 0.5, "unknown hologram filter 'gauss'"),
                                                 ("disk", 1.5, "filter_size must be in")])
def test_bad_filter_settings_fail_before_the_first_frame(name: str, size: float, message: str) -> None:
    with pytest.raises(H.HologramError, match=message):
        H.OffAxisDemodulator(filter_name=name, filter_size=size)


def test_periodic_correction_removes_the_edge_ringing() -> None:
    """An uneven illumination does not match across the frame's edges; the FFT rings from that jump.
    With the periodic component's spectrum (Moisan) the phase error along the four edges of an empty
    hologram falls by a third against the plain spectrum's (0.26 -> 0.18 rad here), inside unchanged."""
    height, width = 96, 128
    yy, xx = np.mgrid[:height, :width]
    carrier = H.Carrier.from_period(5.3, 352.0).canonical()
    envelope = np.exp(-(((yy - 30) / 70.0) ** 2 + ((xx - 90) / 80.0) ** 2))
    image = 200.0 * envelope * (1 + 0.5 * np.cos(2 * np.pi * (carrier.fy * yy + carrier.fx * xx)))
    plan = H.plan_sideband((height, width), carrier)

    def errors(field: np.ndarray) -> tuple[float, float]:
        phase = np.angle(field)
        error = np.abs(np.angle(np.exp(1j * phase) / np.exp(1j * phase[5:-5, 5:-5]).mean()))
        return (float(np.mean([error[0].mean(), error[-1].mean(), error[:, 0].mean(), error[:, -1].mean()])),
                float(error[5:-5, 5:-5].mean()))

    window = np.fft.rfft2(image)[plan.rows, plan.cols]  # the plain spectrum, the same steps otherwise
    np.conjugate(window, out=window, where=plan.conjugate)
    plain_edge, plain_inside = errors(np.fft.ifft2(window * plan.weights) * plan.ramp)
    edge, inside = errors(H.sideband_field(image, plan))
    assert edge < 0.8 * plain_edge
    assert inside < 1.1 * plain_inside + 1e-3
