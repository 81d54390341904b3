"""A runnable demo of prequal-middleware: a host app, a gateway pool at ``/api`` and demo backends.

- ``python -m example_app --backends 4``: everything in one process;
- ``uvicorn example_app.gateway:app --port 8000``: the gateway alone, pools from ``PREQUAL_POOLS``;
- ``uvicorn example_app.backend:app --port 8001``: one demo backend.
"""
