"""Synthetic data for the benchmarks: a DICOM study, photos with EXIF, pyramidal slides.

    imgest bench gen --out DIR [--instances 1000] [--zip] [--photos 10] [--slides 1] [--seed 0]

Everything is a function of `seed` (and the options): the same command writes the same bytes.

- The study: 512×512 16-bit CT slices of one study, one series and one frame of reference
  (~525 KB each: noise over a smooth phantom, so it compresses as scans do), stepping through
  the body 1 mm a slice, with XNAT's routing hint `Project: P Subject: S Session: E` in Study
  Comments; optionally one zip of them (stored: a 1,000-slice zip is ~525 MB, like the files).
- Photos: JPEGs with EXIF (Make, Model, DateTime, DateTimeOriginal, optionally GPS).
- Slides: tiled (256×256) pyramids with levels at 1/4, 1/16… down to ~512 pixels, JPEG or
  uncompressed: Aperio-like SVS (description, thumbnail) or a generic TIFF (levels in SubIFDs).
  Tiles are rendered one at a time as tifffile writes them, so a 100,000-pixel slide takes no
  more memory than a small one.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

Advance = Callable[[int], None]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SIDE = 512  # CT slice rows and columns
TILE = 256
STUDY_DATE = datetime(2024, 1, 15, 9, 30)
CAMERAS = [("Canon", "EOS R5"), ("NIKON CORPORATION", "NIKON Z 7II"), ("SONY", "ILCE-7RM4"),
           ("Apple", "iPhone 14 Pro")]
ZIP_DATE = (2024, 1, 15, 9, 30, 0)  # members' time: a fixed one keeps the zip's bytes fixed


def _noop(_n: int) -> None:
    pass


def parse_size(text: str) -> tuple[int, int]:
    """'20000x15000' → (20000, 15000)."""
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise ValueError(f"a size is WIDTHxHEIGHT, e.g. 20000x15000 (got {text!r})") from None
    if min(size) < 1:
        raise ValueError(f"a size is at least 1x1 (got {text!r})")
    return size


# --- DICOM ----------------------------------------------------------------------------------


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["imgest-bench", str(seed), *map(str, parts)])


def _phantom() -> np.ndarray:
    """A smooth body: a water-like ellipse (about 1,000 over air) with a brighter core."""
    y, x = np.mgrid[-1:1:SIDE * 1j, -1:1:SIDE * 1j]
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    core = x**2 + (y + 0.1) ** 2 < 0.15
    return (body * 1000 + core * 300 + (x + y + 2) * 20).astype(np.uint16)


def write_study(out: Path, instances: int, *, seed: int = 0, project: str = "BENCH",
                subject: str = "SUBJ01", session: str = "SESS01",
                advance: Advance = _noop) -> list[Path]:
    """`instances` CT slices of one study into `out` (IM00001.dcm…); their paths, in order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = (_uid(seed, session, what) for what in ("study", "series", "frame"))
    phantom = _phantom()
    when = STUDY_DATE + timedelta(days=seed % 365)
    paths = []
    for number in range(1, instances + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(
            seed, session, "instance", number)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = when.strftime("%H%M%S")
        ds.ContentTime = (when + timedelta(seconds=number)).strftime("%H%M%S")
        ds.AccessionNumber = f"A{seed:04d}{session}"[:16]
        ds.Modality = "CT"
        ds.Manufacturer = "imgest bench"
        ds.StudyDescription = "Synthetic CT for benchmarks"
        ds.SeriesDescription = "Axial 1 mm"
        ds.PatientName = f"Bench^{subject}"
        ds.PatientID = subject
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyComments = f"Project: {project} Subject: {subject} Session: {session}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, number
        ds.SliceThickness, ds.KVP = 1.0, 120
        z = -0.5 * instances + number  # 1 mm steps, centred on the table's origin
        ds.ImagePositionPatient = [-250.0, -250.0, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = z
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = SIDE
        ds.PixelSpacing = [0.9765625, 0.9765625]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = 40, 400
        # 6 bits of noise: the slices deflate about as much as real CT does.
        noise = np.random.default_rng([seed, number]).integers(0, 64, phantom.shape, np.uint16)
        ds.PixelData = (phantom + noise).astype("<u2").tobytes()
        path = out / f"IM{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        advance(1)
    return paths


def write_zip(files: list[Path], path: Path, folder: str = "study",
              advance: Advance = _noop) -> Path:
    """The files in one zip (stored, not deflated), under `folder/`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for file in files:
            info = zipfile.ZipInfo(f"{folder}/{file.name}", ZIP_DATE)
            with file.open("rb") as src, zf.open(info, "w", force_zip64=False) as dst:
                while chunk := src.read(1024 * 1024):
                    dst.write(chunk)
            advance(1)
    return path


# --- photos ---------------------------------------------------------------------------------


def _photo_pixels(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth scene (two colour gradients and a soft shape) with sensor-like noise."""
    phase = rng.uniform(0, 2 * np.pi, 6)
    xs = np.linspace(0, 2 * np.pi, width, dtype=np.float32)
    ys = np.linspace(0, 2 * np.pi, height, dtype=np.float32)
    image = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        row = np.sin(xs * (channel + 1) / 2 + phase[channel])
        column = np.cos(ys * (channel + 2) / 3 + phase[channel + 3])
        image[..., channel] = 128 + 90 * np.outer(column, row)
    image += rng.integers(-8, 9, image.shape, np.int8)
    return np.clip(image, 0, 255).astype(np.uint8)


def _rational(value: float) -> object:
    from PIL.TiffImagePlugin import IFDRational

    return IFDRational(round(value * 1000), 1000)


def _dms(degrees: float) -> tuple[object, object, object]:
    whole = int(degrees)
    minutes = int((degrees - whole) * 60)
    seconds = (degrees - whole - minutes / 60) * 3600
    return _rational(whole), _rational(minutes), _rational(seconds)


def write_photos(out: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (4032, 3024),
                 gps: bool = True, advance: Advance = _noop) -> list[Path]:
    """`count` JPEGs with EXIF (camera, capture time, GPS if asked) into `out`."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        rng = np.random.default_rng([seed, 1_000_000 + number])
        make, model = CAMERAS[int(rng.integers(len(CAMERAS)))]
        taken = (STUDY_DATE + timedelta(minutes=7 * number)).strftime("%Y:%m:%d %H:%M:%S")
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0131] = make, model, "imgest bench"
        exif[0x0132] = taken  # DateTime
        exif[0x0112] = 1  # Orientation: as stored
        details = exif.get_ifd(0x8769)  # the Exif IFD
        details[0x9003] = details[0x9004] = taken  # DateTimeOriginal, DateTimeDigitized
        details[0xA002], details[0xA003] = size  # PixelXDimension, PixelYDimension
        if gps:
            where = exif.get_ifd(0x8825)
            latitude, longitude = rng.uniform(-60, 60), rng.uniform(-170, 170)
            where[0x0000] = b"\x02\x03\x00\x00"  # GPSVersionID
            where[0x0001], where[0x0002] = "N" if latitude >= 0 else "S", _dms(abs(latitude))
            where[0x0003], where[0x0004] = "E" if longitude >= 0 else "W", _dms(abs(longitude))
        path = out / f"IMG_{number:04d}.jpg"
        Image.fromarray(_photo_pixels(*size, rng)).save(path, "JPEG", quality=90,
                                                        exif=exif.tobytes())
        paths.append(path)
        advance(1)
    return paths


# --- slides ---------------------------------------------------------------------------------


def slide_levels(width: int, height: int) -> list[int]:
    """Downsamples of a pyramid: 1, 4, 16… while a level is at least 512 pixels wide or high
    (as scanners make them)."""
    levels = [1]
    while max(width, height) // (levels[-1] * 4) >= 2 * TILE:
        levels.append(levels[-1] * 4)
    return levels


def slide_tiles(width: int, height: int) -> int:
    """How many tiles a slide's pyramid has (for a progress bar)."""
    return sum(-(-(height // d) // TILE) * -(-(width // d) // TILE)
               for d in slide_levels(width, height))


class _Tissue:
    """A stained section as a function of the baseline's coordinates, so that every level and
    every tile is rendered on its own (no level is made by shrinking another in memory)."""

    def __init__(self, rng: np.random.Generator):
        self.phase = rng.uniform(0, 2 * np.pi, 4)
        self.noise = [rng.integers(-7, 8, (TILE, TILE, 3), np.int16) for _ in range(8)]

    def render(self, x0: int, y0: int, width: int, height: int, downsample: float,
               noise: int = 0) -> np.ndarray:
        xs = (x0 + np.arange(width, dtype=np.float32)) * downsample
        ys = (y0 + np.arange(height, dtype=np.float32)) * downsample
        a, b, c, d = self.phase
        # Smooth blobs of tissue: sin(x)·sin(y) + sin(x + y), the latter as a sum of products,
        # so that the field is made of outer products (cheap) rather than a 2-D sin.
        field = np.outer(np.sin(ys / 1400 + b), np.sin(xs / 1700 + a)) + 0.6 * (
            np.outer(np.cos(ys / 900 + c), np.sin(xs / 900 + d))
            + np.outer(np.sin(ys / 900 + c), np.cos(xs / 900 + d)))
        nuclei = np.outer(np.sin(ys / 7), np.sin(xs / 9))  # fine texture, stain intensity
        tissue = (field > 0.35)[..., None]
        stained = np.stack([215 - 50 * nuclei, 140 - 60 * nuclei, 190 - 30 * nuclei], -1)
        rgb = np.where(tissue, stained, np.float32(242)).astype(np.int16)
        if width == height == TILE:
            rgb += self.noise[noise % len(self.noise)]
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def tiles(self, width: int, height: int, downsample: int, advance: Advance
              ) -> Iterator[np.ndarray]:
        """A level's tiles, row by row, each TILE×TILE (the edges' overhang is cut by readers)."""
        for ty in range(-(-height // TILE)):
            for tx in range(-(-width // TILE)):
                tile = self.render(tx * TILE, ty * TILE, TILE, TILE, downsample,
                                   ty * 7919 + tx * 104729 + downsample)
                advance(1)  # before the yield: tifffile asks for no tile after the last
                yield tile


def write_slide(path: Path, size: tuple[int, int], *, seed: int = 0, fmt: str = "svs",
                compression: str = "jpeg", quality: int = 80, advance: Advance = _noop) -> Path:
    """One pyramidal tiled slide: `fmt` svs (Aperio's layout: baseline, thumbnail, levels) or
    tiff (a generic pyramid, levels in SubIFDs); `compression` jpeg or none."""
    import tifffile

    if fmt not in ("svs", "tiff") or compression not in ("jpeg", "none"):
        raise ValueError(f"format svs|tiff and compression jpeg|none (got {fmt}, {compression})")
    width, height = size
    levels = slide_levels(width, height)
    tissue = _Tissue(np.random.default_rng([seed, 2_000_000, width, height]))
    mpp = 0.25
    codec = {"jpeg": "JPEG/RGB", "none": "RAW"}[compression]
    aperio = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
              f"({TILE}x{TILE}) {codec} Q={quality}")
    common = {"photometric": "rgb", "metadata": None,
              "compression": None if compression == "none" else "jpeg",
              "compressionargs": {"level": quality} if compression == "jpeg" else None}
    raw = sum(3 * (width // d) * (height // d) for d in levels)
    with tifffile.TiffWriter(path, bigtiff=raw > 3 * 1024**3) as tif:  # past 4 GB: BigTIFF
        for i, downsample in enumerate(levels):
            w, h = max(1, width // downsample), max(1, height // downsample)
            extra: dict[str, object] = {}
            if fmt == "svs":
                extra["description"] = aperio + (
                    f"|AppMag = 40|MPP = {mpp}|ScanScope ID = IMGEST-BENCH|Filename = "
                    f"{path.stem}|Date = 01/15/24|Time = 09:30:00" if i == 0
                    else f" -> {w}x{h} D={downsample}")
            elif i == 0:
                extra = {"subifds": len(levels) - 1, "resolutionunit": "CENTIMETER",
                         "resolution": (1e4 / mpp, 1e4 / mpp)}
            else:
                extra["subfiletype"] = 1  # a reduced-resolution version of the baseline
            tif.write(tissue.tiles(w, h, downsample, advance), shape=(h, w, 3), dtype="uint8",
                      tile=(TILE, TILE), **common, **extra)
            if fmt == "svs" and i == 0:  # Aperio's second directory: a small stripped thumbnail
                scale = max(width, height) / 768
                thumb = (max(1, round(width / scale)), max(1, round(height / scale)))
                tif.write(tissue.render(0, 0, *thumb, scale), **common,
                          description=aperio + f" -> {thumb[0]}x{thumb[1]} - ")
    return path


# --- all of it ------------------------------------------------------------------------------


def generate(out: Path, *, instances: int, zipped: bool, photos: int, slides: int,
             slide_size: tuple[int, int], slide_format: str, slide_compression: str,
             photo_size: tuple[int, int], gps: bool, seed: int, project: str, subject: str,
             session: str, progress: Callable[[str, int], Advance]) -> list[Path]:
    """Everything asked for, under `out`; `progress(what, total)` gives each part's advance."""
    out.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    if instances:
        study = write_study(out / "dicom", instances, seed=seed, project=project,
                            subject=subject, session=session,
                            advance=progress(f"DICOM study ({instances} CT slices)", instances))
        made += study
        if zipped:
            made.append(write_zip(study, out / "study.zip", session,
                                  progress("study.zip (stored)", instances)))
    if photos:
        made += write_photos(out / "photos", photos, seed=seed, size=photo_size, gps=gps,
                             advance=progress(f"photos ({photos} JPEG + EXIF)", photos))
    suffix = ".svs" if slide_format == "svs" else ".tif"
    for number in range(1, slides + 1):
        path = out / "slides" / f"slide_{number:02d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        made.append(write_slide(path, slide_size, seed=seed + number, fmt=slide_format,
                                compression=slide_compression,
                                advance=progress(f"slide {number} of {slides} (tiles)",
                                                 slide_tiles(*slide_size))))
    return made
