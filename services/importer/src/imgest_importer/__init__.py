"""imgest importer: sessions and scans out of validated files; archive, prearchive, catalogue."""
