"""The HTTP API: auth (401/403), malformed requests (4xx, clear messages, still serving), streaming, admin, metrics."""

import json
import re

import pytest
import torch
from fastapi.testclient import TestClient

from engram.serve.app import create_app
from engram.serve.tenants import TenantRegistry, add_tenant

from memory.patch_helpers import write_raw_patch
from serve.serve_helpers import bearer, overlay_for, write_patch

COMPLETION = {"prompt": "The zebra code is", "max_tokens": 5, "temperature": 0}
ADMIN_CALLS = [("get", "/admin/tenants", None), ("post", "/admin/tenants/alpha/patch", {"path": "x"}),
               ("delete", "/admin/tenants/alpha/patch", None), ("get", "/metrics", None)]


def error_of(response) -> str:
    return response.json()["error"]["message"]


def complete(client, key, **fields):
    return client.post("/v1/completions", json={**COMPLETION, **fields}, headers=bearer(key))


@pytest.mark.parametrize("headers", [{}, bearer("ek-wrong"), {"Authorization": "Basic abc"}, bearer("")],
                         ids=["missing", "wrong", "not-bearer", "empty"])
def test_missing_or_wrong_key_gets_401(client, headers):
    calls = [("post", "/v1/completions", COMPLETION), ("post", "/v1/completions", b"{not json"),
             ("get", "/v1/models", None), ("get", "/admin/tenants", None), ("get", "/metrics", None),
             ("post", "/admin/tenants/alpha/patch", b"[]")]
    for method, path, body in calls:  # the key is checked first: a bad body without a key still gets 401
        response = client.request(method, path, headers=headers,
                                  **({"content": body} if isinstance(body, bytes) else {"json": body}))
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS, ids=[f"{m}-{p}" for m, p, _ in ADMIN_CALLS])
def test_tenant_key_on_admin_endpoints_gets_403(client, keys, method, path, body):
    response = client.request(method, path, json=body, headers=bearer(keys.alpha))
    assert response.status_code == 403 and "admin key" in error_of(response)


def test_admin_key_is_not_a_tenant_key(client, keys):
    response = complete(client, keys.admin)
    assert response.status_code == 403 and "tenant" in error_of(response)


def test_health_needs_no_key(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_models_lists_the_tenants_model(client, keys):
    response = client.get("/v1/models", headers=bearer(keys.beta))
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["tiny:beta"]
    assert complete(client, keys.beta, model="tiny:beta").status_code == 200
    other = complete(client, keys.beta, model="tiny:alpha")
    assert other.status_code == 404 and "tiny:beta" in error_of(other)


def test_completion_shape(client, keys):
    response = complete(client, keys.alpha)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny:alpha" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


@pytest.mark.parametrize("fields", [{}, {"stop": "e"}, {"max_tokens": 12, "temperature": 0.7, "seed": 5}],
                         ids=["greedy", "stop", "seeded"])
def test_streaming_returns_the_same_text_as_non_streaming(client, keys, fields):
    plain = complete(client, keys.alpha, **fields).json()
    with client.stream("POST", "/v1/completions", json={**COMPLETION, **fields, "stream": True},
                       headers=bearer(keys.alpha)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(chunk["object"] == "text_completion" and chunk["model"] == "tiny:alpha" for chunk in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["usage"] == plain["usage"]


MALFORMED = [
    ("bad-json", dict(content=b'{"prompt": "hi", "max_tokens": '), 422, "invalid JSON body: EOF while parsing a "
                                                                        "value at line 1 column 31"),
    ("not-an-object", dict(json=["hi"]), 422, "the body must be a JSON object"),
    ("empty-body", dict(content=b""), 422, "invalid JSON body"),
    ("unknown-field", dict(json={**COMPLETION, "frequency_penalty": 1}), 422, "unknown field 'frequency_penalty'"),
    ("missing-prompt", dict(json={"max_tokens": 3}), 422, "prompt: Field required"),
    ("prompt-not-string", dict(json={**COMPLETION, "prompt": ["a", "b"]}), 422, "prompt"),
    ("max-tokens-string", dict(json={**COMPLETION, "max_tokens": "5"}), 422, "max_tokens"),
    ("max-tokens-absurd", dict(json={**COMPLETION, "max_tokens": 10**12}), 400, "got 1000000000000"),
    ("max-tokens-negative", dict(json={**COMPLETION, "max_tokens": -3}), 400, "got -3"),
    ("prompt-past-context", dict(json={**COMPLETION, "prompt": "zebra " * 600}), 400, "exceeds the model's context"),
    ("temperature", dict(json={**COMPLETION, "temperature": 9}), 400, "temperature must be in [0, 2], got 9"),
    ("stops", dict(json={**COMPLETION, "stop": ["a"] * 5}), 400, "at most 4"),
]


@pytest.mark.parametrize("request_args, status, message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_4xx_with_clear_messages_and_the_server_keeps_serving(client, keys, request_args,
                                                                                     status, message):
    headers = {**bearer(keys.alpha), "Content-Type": "application/json"}
    response = client.post("/v1/completions", headers=headers, **request_args)
    assert response.status_code == status, response.text
    assert message in error_of(response)
    assert complete(client, keys.alpha, max_tokens=2).status_code == 200


def test_validation_errors_name_the_field(client, keys):
    response = complete(client, keys.alpha, frequency_penalty=1, max_tokens="3")
    assert response.status_code == 422 and response.json()["error"]["param"] == "max_tokens"
    assert error_of(response) == ("max_tokens: Input should be a valid integer; unknown field 'frequency_penalty': "
                                  "this server does not support it")
    bad_admin = client.post("/admin/tenants/alpha/patch", json={"file": "x"}, headers=bearer(keys.admin))
    assert bad_admin.status_code == 422 and "unknown field 'file'" in error_of(bad_admin)


def test_oversized_body_gets_413_before_it_is_read_whole(engine, registry, keys):
    with TestClient(create_app(engine, registry, max_body_bytes=1000)) as small:
        response = small.post("/v1/completions", json={**COMPLETION, "prompt": "x" * 2000}, headers=bearer(keys.alpha))
        assert response.status_code == 413 and "limit of 1000 bytes" in error_of(response)
        assert small.post("/v1/completions", json=COMPLETION, headers=bearer(keys.alpha)).status_code == 200


def test_prompt_past_context_names_the_lengths(client, keys, engine):
    prompt = "zebra " * 300
    length = len(engine.encode(prompt))
    response = complete(client, keys.alpha, prompt=prompt, max_tokens=4)
    assert response.status_code == 400
    assert (f"prompt of {length} tokens + max_tokens 4 = {length + 4} tokens exceeds the model's context of 512 tokens"
            == error_of(response))


def test_unknown_route_and_method(client, keys):
    assert client.get("/v1/nothing", headers=bearer(keys.alpha)).status_code == 404
    assert client.get("/v1/completions", headers=bearer(keys.alpha)).status_code == 405


def test_admin_loads_lists_and_unloads_patches(client, keys, engine, tmp_path):
    prompt_ids = engine.encode(COMPLETION["prompt"])
    patch = write_patch(engine.model, tmp_path / "alpha.safetensors", overlay_for(engine.model, prompt_ids, seed=1))
    base_text = complete(client, keys.alpha).json()["choices"][0]["text"]

    loaded = client.post("/admin/tenants/alpha/patch", json={"path": str(patch)}, headers=bearer(keys.admin))
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["overlay_rows"] > 0 and loaded.json()["patch"] == str(patch)
    listed = {t["name"]: t for t in client.get("/admin/tenants", headers=bearer(keys.admin)).json()["tenants"]}
    assert listed["alpha"]["overlay_rows"] > 0 and listed["beta"]["overlay_rows"] == 0
    patched_text = complete(client, keys.alpha).json()["choices"][0]["text"]
    assert patched_text != base_text
    assert complete(client, keys.beta).json()["choices"][0]["text"] == base_text  # beta reads the base

    unloaded = client.delete("/admin/tenants/alpha/patch", headers=bearer(keys.admin))
    assert unloaded.status_code == 200 and unloaded.json()["patch"] is None
    assert complete(client, keys.alpha).json()["choices"][0]["text"] == base_text


def test_refused_patches_get_400_and_the_old_overlay_stays(client, keys, engine, tmp_path):
    overlay = overlay_for(engine.model, engine.encode("x"), seed=2)
    good = write_patch(engine.model, tmp_path / "good.safetensors", overlay)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    gate_tuned = write_patch(engine.model, tmp_path / "gates.safetensors", overlay, dense=True)
    admin = bearer(keys.admin)
    assert client.post("/admin/tenants/beta/patch", json={"path": str(good)}, headers=admin).status_code == 200
    for path, message in ((truncated, "truncated or corrupt"), (tmp_path / "absent.safetensors", "no memory patch"),
                          (gate_tuned, "gate-tuned patches cannot be served as overlays")):
        response = client.post("/admin/tenants/beta/patch", json={"path": str(path)}, headers=admin)
        assert response.status_code == 400 and message in error_of(response), response.text
    assert client.get("/admin/tenants", headers=admin).json()["tenants"][1]["patch"] == str(good)
    missing = client.post("/admin/tenants/nobody/patch", json={"path": str(good)}, headers=admin)
    assert missing.status_code == 404 and "nobody" in error_of(missing)


def test_truncated_patch_is_refused_at_startup(engine, tmp_path):
    good = write_patch(engine.model, tmp_path / "p.safetensors", overlay_for(engine.model, engine.encode("x"), 3))
    tenants = tmp_path / "tenants.toml"
    add_tenant(tenants, "ok", patch=good)
    add_tenant(tenants, "cut", patch=write_patch(engine.model, tmp_path / "cut.safetensors",
                                                 overlay_for(engine.model, engine.encode("x"), 3)))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # damaged since
    with pytest.raises(ValueError, match=r"tenant 'cut': patch .*cut\.safetensors refused: .*truncated or corrupt"):
        TenantRegistry.from_file(tenants, engine.load_overlay)


def poisoned_patch(engine, path, how: str):
    """A patch of rows "The zebra code is" reads, written with a valid checksum but NaN or FP8 values or without
    its base fingerprint."""
    overlay = overlay_for(engine.model, engine.encode(COMPLETION["prompt"]), seed=6)
    tensors = {}
    for layer_id, (rows, values) in overlay.layers.items():
        values = values.clone()
        values[0, 0] = float("nan") if how == "nan" else values[0, 0]
        tensors[f"layers.{layer_id}.rows"] = rows
        tensors[f"layers.{layer_id}.values"] = values.to(torch.float8_e4m3fn) if how == "fp8" else values
    header = {"metadata": "{}"} if how == "no-fingerprint" else {"base_fingerprint": engine.base_fingerprint,
                                                                 "metadata": "{}"}
    return write_raw_patch(path, tensors, header)


POISONED = [("nan", "NaN or infinite element"), ("fp8", "got torch.float8_e4m3fn"),
            ("no-fingerprint", "the patch header lacks ['base_fingerprint']")]


@pytest.mark.parametrize("how, message", POISONED, ids=[how for how, _ in POISONED])
def test_poisoned_patches_are_refused_by_the_admin_api_and_at_startup(client, keys, engine, tmp_path, how, message):
    bad = poisoned_patch(engine, tmp_path / "bad.safetensors", how)
    response = client.post("/admin/tenants/beta/patch", json={"path": str(bad)}, headers=bearer(keys.admin))
    assert response.status_code == 400 and message in error_of(response), response.text
    assert response.json()["error"]["code"] == "patch_refused"
    assert client.get("/admin/tenants", headers=bearer(keys.admin)).json()["tenants"][1]["overlay_rows"] == 0
    assert complete(client, keys.beta).status_code == 200

    tenants = tmp_path / "tenants.toml"
    good = write_patch(engine.model, tmp_path / "good.safetensors", overlay_for(engine.model, engine.encode("x"), 3))
    add_tenant(tenants, "victim", patch=good)
    bad.replace(good)  # the file changed after it was added
    startup_error = r"tenant 'victim': patch .*good\.safetensors refused: .*" + re.escape(message)
    with pytest.raises(ValueError, match=startup_error):
        TenantRegistry.from_file(tenants, engine.load_overlay)


def test_metrics_for_the_admin(client, keys):
    complete(client, keys.alpha, max_tokens=2)
    response = client.get("/metrics", headers=bearer(keys.admin))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'engram_requests_total{endpoint="/v1/completions",status="200",tenant="alpha"}' in text
    for name in ("engram_batch_size_count", "engram_request_seconds_bucket", "engram_completion_tokens_total",
                 "engram_queue_depth"):
        assert name in text
