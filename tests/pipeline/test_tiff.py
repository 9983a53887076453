"""Multi-page TIFF and OME-TIFF stacks: every page a frame, 16-bit kept, named stack_p000…, pixel size and
frame rate from the metadata, damaged pages skipped like damaged PNGs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app import replay
from app.config import Config, replace
from app.pipeline.sources import SourceError, TiffStackSource, open_source

pytestmark = pytest.mark.timeout(60)


def stack(count: int = 10, size: int = 48, dtype: type = np.uint16) -> np.ndarray:
    """Pages with a bright disc and the page number at pixel (0, 0)."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(dtype)
    pages = np.stack([disc * (60000 if dtype == np.uint16 else 200) + k for k in range(count)]).astype(dtype)
    pages[:, 0, 0] = np.arange(count)
    return pages


def test_a_16_bit_stack_is_a_sequence_of_its_pages_read_ahead_in_order(tmp_path):
    pages = stack(10)
    tifffile.imwrite(tmp_path / "stack.tif", pages)
    with open_source(str(tmp_path / "stack.tif"), replace(Config(), source={"prefetch_threads": 4})) as source:
        frames = list(source)
        assert isinstance(source, TiffStackSource) and not source.live
        assert (source.info.kind, source.info.frame_count, source.info.pixel_size_um) == ("tiff", 10, None)
    assert [f.index for f in frames] == list(range(10))
    assert [f.name for f in frames] == [f"stack_p{k:03d}" for k in range(10)]
    for frame, page in zip(frames, pages, strict=True):
        assert frame.image.dtype == np.uint16
        np.testing.assert_array_equal(frame.image, page)


def test_a_single_page_tiff_is_one_frame_named_after_its_file_and_rgb_becomes_bgr(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", stack(1)[0])
    with open_source(str(tmp_path / "one.tif"), Config()) as source:
        (frame,) = list(source)
    assert frame.name == "one.tif" and frame.stem == "one" and frame.image.dtype == np.uint16
    rgb = np.zeros((2, 16, 16, 3), np.uint8)
    rgb[..., 0] = 255  # red
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with open_source(str(tmp_path / "rgb.tif"), Config()) as source:
        frames = list(source)
    assert len(frames) == 2 and frames[0].image.shape == (16, 16, 3)
    assert frames[0].image[0, 0].tolist() == [0, 0, 255]  # BGR, as every other source


def test_a_folder_or_glob_holding_one_stack_reads_its_pages(tmp_path):
    tifffile.imwrite(tmp_path / "run.ome.tif", stack(5), metadata={"axes": "TYX"})
    for uri in (str(tmp_path), str(tmp_path / "*.tif")):
        with open_source(uri, Config()) as source:
            assert [f.name for f in source] == [f"run_p{k:03d}" for k in range(5)]


def test_a_folder_of_several_stacks_warns_that_it_reads_one_page_of_each(tmp_path, caplog):
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(tmp_path / name, stack(5))
    with caplog.at_level(logging.WARNING), open_source(str(tmp_path), Config()) as source:
        assert [f.name for f in source] == ["a.tif", "b.tif"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{tmp_path / 'a.tif'} has 5 pages, but a folder or glob of TIFFs reads the first")


@pytest.mark.parametrize("write, pixel_size_um, fps", [
    (lambda path, pages: tifffile.imwrite(path, pages, metadata={
        "axes": "TYX", "PhysicalSizeX": 345.0, "PhysicalSizeXUnit": "nm", "TimeIncrement": 50.0,
        "TimeIncrementUnit": "ms"}), 0.345, 20.0),
    (lambda path, pages: tifffile.imwrite(path, pages, metadata={"axes": "TYX", "PhysicalSizeX": 0.65}),
     0.65, None),
    (lambda path, pages: tifffile.imwrite(path, pages, imagej=True, resolution=(4.0, 4.0),
                                          metadata={"axes": "TYX", "unit": "um", "finterval": 0.1}), 0.25, 10.0),
    (lambda path, pages: tifffile.imwrite(path, pages, resolution=(10_000.0, 10_000.0),
                                          resolutionunit="CENTIMETER"), 1.0, None),
    (lambda path, pages: tifffile.imwrite(path, pages), None, None),
], ids=["ome-nm", "ome-default-unit", "imagej", "resolution-cm", "none"])
def test_pixel_size_and_frame_rate_come_from_the_metadata(tmp_path, write, pixel_size_um, fps):
    path = tmp_path / "stack.ome.tif"
    write(path, stack(5))
    with open_source(str(path), Config()) as source:
        info = source.info
    assert info.pixel_size_um == (pytest.approx(pixel_size_um) if pixel_size_um else None)
    assert info.fps == (pytest.approx(fps) if fps else None)


def damaged_stack(path: Path, count: int = 6, bad_page: int = 3) -> np.ndarray:
    pages = np.random.default_rng(0).integers(0, 65535, (count, 32, 32), dtype=np.uint16)
    tifffile.imwrite(path, pages, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[bad_page].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset + 10:offset + 40] = b"\xff" * 30
    path.write_bytes(bytes(data))
    return pages


def test_a_damaged_page_is_skipped_with_a_warning_or_fatal_when_strict(tmp_path, caplog):
    pages = damaged_stack(tmp_path / "bad.tif")
    with caplog.at_level(logging.WARNING), open_source(str(tmp_path / "bad.tif"), Config()) as source:
        frames = list(source)
        assert source.frames_skipped == 1
    assert [f.index for f in frames] == [0, 1, 2, 4, 5]
    assert [f.name for f in frames] == ["bad_p000", "bad_p001", "bad_p002", "bad_p004", "bad_p005"]
    for frame in frames:
        np.testing.assert_array_equal(frame.image, pages[frame.index])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith(f"skipping unreadable page 3 of {tmp_path / 'bad.tif'}")
    strict = replace(Config(), source={"strict": True})
    with open_source(str(tmp_path / "bad.tif"), strict) as source, \
            pytest.raises(SourceError, match=r"^cannot read page 3 of .*bad\.tif \(.*\)$"):
        list(source)


@pytest.mark.parametrize("content, message", [
    (b"not a tiff at all", r"^cannot read TIFF .*x\.tif \(not a TIFF file"),
    (None, r"^TIFF .*x\.tif has float32 pages; only 8- or 16-bit unsigned integer images are read$"),
])
def test_a_file_that_is_no_readable_stack_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "x.tif"
    if content is None:
        tifffile.imwrite(path, np.zeros((2, 8, 8), np.float32))
    else:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=message):
        open_source(str(path), Config())


def test_replay_of_a_10_page_stack_writes_10_masks_named_after_the_pages(tiny_weights, tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", stack(10, size=64))
    code = replay.main([str(tmp_path / "stack.tif"), "--weights", str(tiny_weights), "-q",
                        "--masks", str(tmp_path / "masks"), "--csv", str(tmp_path / "rows.csv")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [f"stack_p{k:03d}.png" for k in range(10)]
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 1 + 10
