"""`python -m imgest_gateway`: migrate, then serve (from IMGEST_GATEWAY_WORKERS processes)."""

from imgest_runtime.workers import metrics_dir, worker_count

from .settings import Settings


def main() -> None:
    settings = Settings()
    workers = worker_count(settings.gateway_workers)
    # The workers share the gateway's connections to PostgreSQL out: each keeps its share.
    settings = settings.model_copy(update={
        "database_pool_size": max(2, settings.database_pool_size // workers)})
    # Before anything imports prometheus_client, which picks where metrics live as it loads.
    metrics_dir(settings.data_dir, "gateway", workers)
    from imgest_runtime.service import serve

    from .app import build_app

    serve(lambda: build_app(settings), settings, settings.gateway_port, "gateway",
          workers=workers)


if __name__ == "__main__":
    main()
