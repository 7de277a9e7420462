"""imgest notifier: tells uploaders by email what became of their uploads."""
