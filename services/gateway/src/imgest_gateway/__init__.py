"""imgest gateway: the HTTP ways in, and the upload status users read."""
