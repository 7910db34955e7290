"""Serving one model to many tenants, each reading its own memory patch (``engram serve``, see docs/serve.md).

:mod:`engram.serve.engine` (the batching worker, :class:`~engram.serve.engine.Engine`),
:mod:`engram.serve.tenants` (the tenants file) and :mod:`engram.serve.metrics` run without the ``serve`` extra, as
does :mod:`engram.serve.generate` (``engram generate``: one prompt sampled in this process, no server);
:mod:`engram.serve.app` (the HTTP API) and :mod:`engram.cli.serve` need it (FastAPI, uvicorn).
"""
