"""`python -m imgest_importer`: migrate, then serve."""

from imgest_runtime.service import serve

from .app import build_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    serve(lambda: build_app(settings), settings, settings.importer_port, "importer")


if __name__ == "__main__":
    main()
