"""OpenAI-compatible HTTP server over the reference engine: ``app`` (routes, limits, shutdown),
``loop`` (the engine thread and its Prometheus metrics), ``protocol`` (OpenAI request and response
schemas). Importing this package needs the ``server`` extra (FastAPI, uvicorn)."""
