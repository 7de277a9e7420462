"""imgest metadata: identifies each staged file and reads its headers (DICOM, EXIF)."""
