"""`imgest bench gen`: what it writes reads back as a study, photos with EXIF and a slide."""

import zipfile
from pathlib import Path

import exifread
import pydicom
import tiffslide
from typer.testing import CliRunner

from imgest.benchgen import write_slide, write_study
from imgest.cli import app


def test_bench_gen_writes_a_study_photos_and_a_slide(tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = CliRunner().invoke(app, [
        "bench", "gen", "--out", str(out), "--instances", "3", "--zip", "--photos", "2",
        "--photo-size", "320x240", "--slides", "1", "--slide-size", "2048x1536",
        "--project", "P1", "--subject", "S1", "--session", "E1", "--seed", "7"])
    assert result.exit_code == 0, result.output

    studies = [pydicom.dcmread(p) for p in sorted((out / "dicom").glob("*.dcm"))]
    assert [ds.InstanceNumber for ds in studies] == [1, 2, 3]
    assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID)
                for ds in studies}) == 1
    assert len({ds.SOPInstanceUID for ds in studies}) == 3
    assert {ds.StudyComments for ds in studies} == {"Project: P1 Subject: S1 Session: E1"}
    assert [float(ds.SliceLocation) for ds in studies] == [-0.5, 0.5, 1.5]
    assert studies[0].pixel_array.shape == (512, 512)
    assert 520_000 < (out / "dicom" / "IM00001.dcm").stat().st_size < 530_000
    # The same seed, the same bytes.
    again = write_study(tmp_path / "again", 3, seed=7, project="P1", subject="S1", session="E1")
    assert again[0].read_bytes() == (out / "dicom" / "IM00001.dcm").read_bytes()

    with zipfile.ZipFile(out / "study.zip") as zf:
        assert [i.filename for i in zf.infolist()] == [f"E1/IM0000{n}.dcm" for n in (1, 2, 3)]
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}

    photos = sorted((out / "photos").glob("*.jpg"))
    assert len(photos) == 2
    with photos[0].open("rb") as f:
        tags = exifread.process_file(f, details=False)
    assert str(tags["Image Make"]) and str(tags["Image Model"])
    assert str(tags["EXIF DateTimeOriginal"]).startswith("2024:01:15")
    assert str(tags["GPS GPSLatitudeRef"]) in ("N", "S")

    with tiffslide.TiffSlide(out / "slides" / "slide_01.svs") as slide:
        assert slide.dimensions == (2048, 1536)
        assert slide.level_count > 1
        assert slide.properties["tiffslide.vendor"] == "aperio"
        assert slide.read_region((0, 0), 1, (64, 64)).size == (64, 64)


def test_a_generic_uncompressed_pyramid_is_a_slide_too(tmp_path: Path) -> None:
    path = write_slide(tmp_path / "s.tif", (2048, 1536), fmt="tiff", compression="none")
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((2048, 1536), (512, 384))
        assert float(slide.properties["tiffslide.mpp-x"]) == 0.25
        assert slide.ts_tifffile.pages.first.compression == 1  # none
