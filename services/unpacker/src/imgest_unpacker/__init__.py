"""imgest unpacker: archives into staged files; other files passed on as they are."""
