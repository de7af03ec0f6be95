# gunicorn -c example_app/gunicorn.conf.py 'example_app:create_app()'
from flask_sharedstate.gunicorn import on_exit, on_starting  # noqa: F401 - gunicorn hooks

bind = "127.0.0.1:8000"
workers = 4
# Recycling workers is safe: the state server is not a worker's child.
max_requests = 1000
max_requests_jitter = 100
