"""gunicorn config for tests/integrationapp.py: every worker starts its scheduler."""


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    import integrationapp

    integrationapp.start_scheduler()
