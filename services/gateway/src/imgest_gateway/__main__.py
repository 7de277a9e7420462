"""`python -m imgest_gateway`: migrate, then serve."""

from imgest_runtime.service import serve

from .app import build_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    serve(lambda: build_app(settings), settings, settings.gateway_port, "gateway")


if __name__ == "__main__":
    main()
