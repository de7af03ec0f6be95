# gunicorn -c example_app/gunicorn.conf.py 'example_app:create_app()'
from flask_sharedstate.gunicorn import on_exit, on_starting  # noqa: F401 - gunicorn hooks

bind = "127.0.0.1:8000"
workers = 4
# Recycling workers is safe: the state server is not a worker's child.
max_requests = 1000
max_requests_jitter = 100


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """Each worker runs the example's scheduler; shared.leader() picks who does the job."""
    from example_app import start_scheduler

    start_scheduler(worker.wsgi)  # the Flask app that create_app() returned
