"""`python -m imgest_metadata`: migrate, then serve."""

from imgest_runtime.service import serve

from .app import build_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    serve(lambda: build_app(settings), settings, settings.metadata_port, "metadata")


if __name__ == "__main__":
    main()
