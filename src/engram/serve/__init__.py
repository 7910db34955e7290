"""Serving one model to many tenants, each reading its own memory patch (``engram serve``, see docs/serve.md).

:mod:`engram.serve.app` (the HTTP API) and :mod:`engram.serve.cli` need the ``serve`` extra (FastAPI, uvicorn);
the engine, the tenants file and the metrics imported here do not, nor does :mod:`engram.serve.generate` (``engram
generate``: one prompt sampled in this process, no server).
"""

from engram.serve.engine import (
    Completion,
    Engine,
    EngineBusy,
    EngineClosed,
    GenerationEvent,
    GenerationRequest,
    Job,
    TextStream,
)
from engram.serve.metrics import Metrics
from engram.serve.tenants import (
    Tenant,
    TenantEntry,
    TenantRegistry,
    TenantsFile,
    add_tenant,
    hash_key,
    new_key,
    read_tenants,
    write_tenants,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "GenerationEvent",
    "GenerationRequest",
    "Job",
    "Metrics",
    "Tenant",
    "TenantEntry",
    "TenantRegistry",
    "TenantsFile",
    "TextStream",
    "add_tenant",
    "hash_key",
    "new_key",
    "read_tenants",
    "write_tenants",
]
