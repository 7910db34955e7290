"""Shared fixtures of the server tests: an untrained tiny model, one running engine, two tenants, an HTTP client."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from engram.model import EngramLM, EngramLMConfig
from engram.serve.app import create_app
from engram.serve.engine import Engine
from engram.serve.tenants import TenantRegistry, add_tenant

from memory.fact import fact_memory  # noqa: F401  (tests/memory's session fixture: a base model and a fact patch)


@dataclass(frozen=True)
class Keys:
    admin: str
    alpha: str
    beta: str


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset, untrained (seed 0), saved as a model folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve-tiny")
    EngramLM(EngramLMConfig.from_preset("tiny")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def engine(tiny_checkpoint):
    with Engine.from_checkpoint(tiny_checkpoint, device="cpu", model_name="tiny", max_batch=16,
                                batch_window_s=0.01, max_tokens_limit=64) as running:
        yield running


@pytest.fixture(scope="session")
def tenants_path(tmp_path_factory) -> tuple[Path, Keys]:
    path = tmp_path_factory.mktemp("serve-tenants") / "tenants.toml"
    alpha, admin = add_tenant(path, "alpha")
    beta, _ = add_tenant(path, "beta")
    return path, Keys(admin, alpha, beta)


@pytest.fixture(scope="session")
def keys(tenants_path) -> Keys:
    return tenants_path[1]


@pytest.fixture()
def registry(engine, tenants_path) -> TenantRegistry:
    """A fresh registry per test: admin changes of one test do not leak into the next."""
    return TenantRegistry.from_file(tenants_path[0], engine.load_overlay)


@pytest.fixture()
def client(engine, registry):
    with TestClient(create_app(engine, registry)) as test_client:
        yield test_client
