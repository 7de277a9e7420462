"""`python -m imgest_gateway`: migrate, then serve (from IMGEST_GATEWAY_WORKERS processes)."""

from imgest_runtime.workers import metrics_dir, worker_count

# Before anything imports prometheus_client, which picks where metrics live as it loads.
metrics_dir("gateway", "IMGEST_GATEWAY_WORKERS")

from imgest_runtime.service import serve

from .app import build_app
from .settings import Settings


def main() -> None:
    settings = Settings()
    serve(lambda: build_app(settings), settings, settings.gateway_port, "gateway",
          workers=worker_count(settings.gateway_workers))


if __name__ == "__main__":
    main()
