"""Isolation: a fact taught to tenant A by memory-only tuning is produced for A, never for B nor without a key."""

import pytest
from fastapi.testclient import TestClient

from engram.serve.app import create_app
from engram.serve.engine import Engine
from engram.serve.tenants import TenantRegistry, add_tenant

from memory.fact import ANSWER, PROMPT
from serve.serve_helpers import bearer

SECRET = ANSWER.strip(" .")  # "4217"
ANSWER_TOKENS = 6  # of the fact base's BPE tokenizer; checked below


@pytest.fixture(scope="module")
def fact_server(fact_memory, tmp_path_factory):
    """The fact's base model served to tenant ``a`` (with the fact patch) and ``b`` (without)."""
    tenants = tmp_path_factory.mktemp("fact-tenants") / "tenants.toml"
    key_a, admin = add_tenant(tenants, "a", patch=fact_memory.patch_path)
    key_b, _ = add_tenant(tenants, "b")
    with Engine.from_checkpoint(fact_memory.base_dir, device="cpu", model_name="fact", max_batch=8) as engine:
        assert len(fact_memory.answer_ids(engine.model)) == ANSWER_TOKENS
        registry = TenantRegistry.from_file(tenants, engine.load_overlay)
        with TestClient(create_app(engine, registry)) as client:
            yield client, engine, registry, dict(a=key_a, b=key_b, admin=admin)


def ask(client, key: str | None, **fields):
    body = {"prompt": PROMPT, "max_tokens": ANSWER_TOKENS, "temperature": 0, **fields}
    return client.post("/v1/completions", json=body, headers=bearer(key) if key else {})


def text_of(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_the_fact_is_produced_for_a_only(fact_server):
    client, _, _, keys = fact_server
    assert text_of(ask(client, keys["a"])) == ANSWER
    assert SECRET not in text_of(ask(client, keys["b"], max_tokens=16))
    for seed in range(4):  # nor by sampling
        assert SECRET not in text_of(ask(client, keys["b"], temperature=0.8, seed=seed, max_tokens=16))
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers=bearer(keys["b"])) as response:
        assert SECRET not in "".join(response.iter_lines())


def test_no_key_or_a_wrong_key_gets_nothing(fact_server):
    client, _, _, keys = fact_server
    for key in (None, "ek-not-a-key", keys["a"] + "x", keys["a"][:-1]):
        response = ask(client, key)
        assert response.status_code == 401 and SECRET not in response.text
    other_model = ask(client, keys["b"], model="fact:a")  # b cannot borrow a's model id either
    assert other_model.status_code == 404 and SECRET not in other_model.text


def test_a_and_b_in_one_batch_each_read_their_own_memory(fact_server):
    _, engine, registry, _ = fact_server
    overlay_a = registry.get("a").overlay
    requests = [engine.prepare(PROMPT, max_tokens=ANSWER_TOKENS, temperature=0, overlay=overlay) for overlay in
                (overlay_a, None, overlay_a, None, None)]
    completions = engine.complete_many(requests)
    assert [c.batch_size for c in completions] == [5] * 5
    assert [c.text == ANSWER for c in completions] == [True, False, True, False, False]
    assert not any(SECRET in c.text for c in completions[1::2] + completions[4:])


def test_unloading_the_patch_takes_the_fact_away(fact_server, fact_memory):
    client, _, _, keys = fact_server
    admin = bearer(keys["admin"])
    assert client.delete("/admin/tenants/a/patch", headers=admin).status_code == 200
    assert SECRET not in text_of(ask(client, keys["a"]))
    loaded = client.post("/admin/tenants/a/patch", json={"path": str(fact_memory.patch_path)}, headers=admin)
    assert loaded.status_code == 200 and loaded.json()["overlay_rows"] > 0
    assert text_of(ask(client, keys["a"])) == ANSWER
