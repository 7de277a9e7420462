"""`python -m imgest_unpacker`: migrate, then serve."""

from imgest_runtime.service import serve

from .app import build_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    serve(lambda: build_app(settings), settings, settings.unpacker_port, "unpacker")


if __name__ == "__main__":
    main()
