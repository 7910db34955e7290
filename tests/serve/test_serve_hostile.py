"""Hostile requests: poisonous sampling parameters, rows that fail, huge prompts. One request never fails another,
an error names only its own request, and the event loop keeps answering while prompts are tokenised."""

import asyncio
import json
import threading

import httpx
import pytest
import torch

from engram.model import RowOverlay
from engram.model.sampling import GREEDY_BELOW
from engram.serve.app import create_app
from engram.serve.engine import Engine

from serve.serve_helpers import bearer, overlay_for

PROMPTS = ("The zebra code is", "Once upon a time", "def main():", "the king and the queen")
POISON = ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-46})  # overflowed the logits / rounded to 0


def greedy(engine, prompt: str, max_tokens: int = 4) -> str:
    return engine.complete(engine.prepare(prompt, max_tokens=max_tokens, temperature=0)).text


def test_tiny_temperatures_become_greedy_before_the_batch(engine):
    assert engine.prepare("hi", temperature=1e-40).temperature == 0.0
    assert engine.prepare("hi", temperature=GREEDY_BELOW / 2).temperature == 0.0
    assert engine.prepare("hi", temperature=GREEDY_BELOW).temperature == GREEDY_BELOW
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be in"):
            engine.prepare("hi", temperature=bad)
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.prepare("hi", top_p=float("nan"))


def test_poisonous_parameters_in_one_batch_fail_no_one(engine):
    normal = [engine.prepare(prompt, max_tokens=4, temperature=0) for prompt in PROMPTS]
    hostile = [engine.prepare(PROMPTS[i % 2], max_tokens=4, **POISON[i % 2]) for i in range(4)]
    requests = [request for pair in zip(normal, hostile) for request in pair]  # interleaved
    completions = engine.complete_many(requests)
    assert [c.batch_size for c in completions] == [len(requests)] * len(requests)
    assert [c.finish_reason for c in completions] == ["length"] * len(requests), [c.error for c in completions]
    assert [c.text for c in completions[::2]] == [greedy(engine, prompt) for prompt in PROMPTS]
    assert completions[1].text == completions[0].text  # temperature 1e-40 is greedy
    assert completions[3].text == completions[2].text  # top_p 1e-46 keeps the top token alone: greedy too


def bad_layer_overlay(layer_id: int) -> RowOverlay:
    """An overlay naming a layer the model lacks: any batch holding it raises, naming the layer."""
    return RowOverlay({layer_id: (torch.tensor([1, 2]), torch.randn(2, 8))})


def nan_overlay(engine, prompt: str) -> RowOverlay:
    """The rows ``prompt`` reads replaced by NaN: the row's scores come out NaN."""
    overlay = overlay_for(engine.model, engine.encode(prompt), seed=0)
    return RowOverlay({layer: (rows, torch.full_like(values, float("nan")))
                       for layer, (rows, values) in overlay.layers.items()})


def test_a_failing_row_fails_alone_with_its_own_error(engine):
    """Rows that make the batch raise (layers 97 and 98) or give NaN scores fail alone; each error names its own
    cause only; every other row finishes with the text it has when run alone."""
    good_overlay = overlay_for(engine.model, engine.encode(PROMPTS[0]), seed=4)
    requests = [
        engine.prepare(PROMPTS[0], max_tokens=4, temperature=0, overlay=good_overlay),
        engine.prepare(PROMPTS[1], max_tokens=4, temperature=0, overlay=bad_layer_overlay(97)),
        engine.prepare(PROMPTS[2], max_tokens=4, temperature=0),
        engine.prepare(PROMPTS[3], max_tokens=4, temperature=0.8, overlay=nan_overlay(engine, PROMPTS[3])),
        engine.prepare(PROMPTS[0], max_tokens=5, temperature=0),
        engine.prepare(PROMPTS[1], max_tokens=4, temperature=0, overlay=bad_layer_overlay(98)),
        engine.prepare(PROMPTS[3], max_tokens=6, temperature=0.7, seed=9),
    ]
    completions = engine.complete_many(requests)
    reasons = [c.finish_reason for c in completions]
    assert reasons == ["length", "error", "length", "error", "length", "error", "length"], completions
    assert "layer 97" in completions[1].error and "98" not in completions[1].error
    assert "layer 98" in completions[5].error and "97" not in completions[5].error
    assert completions[3].error == "the model's scores for this request are NaN or infinite"
    for index in (0, 2, 4, 6):
        alone = engine.complete(requests[index])
        assert (completions[index].text, completions[index].error) == (alone.text, None), index
    assert engine.alive and greedy(engine, PROMPTS[2]) == completions[2].text


async def poisoned_traffic(app, keys, rounds: int) -> list[tuple[str, int, str]]:
    """Two hostile clients (tenant beta) and six normal ones (tenant alpha) sending requests concurrently."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engram", timeout=120) as client:
        async def one_client(index: int, hostile: bool) -> list[tuple[str, int, str]]:
            results = []
            for round_index in range(rounds):
                prompt = PROMPTS[(index + round_index) % len(PROMPTS)]
                fields = POISON[(index + round_index) % 2] if hostile else {"temperature": 0}
                body = {"prompt": prompt, "max_tokens": 4, **fields, "stream": round_index % 3 == 2}
                key = keys.beta if hostile else keys.alpha
                response = await client.post("/v1/completions", json=body, headers=bearer(key))
                if body["stream"] and response.status_code == 200:
                    assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
                    text = "".join(json.loads(line[6:])["choices"][0]["text"]
                                   for line in response.text.splitlines() if line.startswith("data: {"))
                else:
                    text = response.json()["choices"][0]["text"] if response.status_code == 200 else response.text
                results.append(("hostile" if hostile else prompt, response.status_code, text))
            return results

        clients = [one_client(i, hostile=i < 2) for i in range(8)]
        return [result for results in await asyncio.gather(*clients) for result in results]


def test_normal_tenants_are_served_while_another_sends_poison(engine, registry, keys):
    expected = {prompt: greedy(engine, prompt) for prompt in PROMPTS}
    batches_before = engine.metrics.value("engram_batches_total")
    results = asyncio.run(poisoned_traffic(create_app(engine, registry), keys, rounds=4))
    normal = [(prompt, status, text) for prompt, status, text in results if prompt != "hostile"]
    assert len(normal) == 24 and all(status == 200 for _, status, _ in normal), normal
    assert all(text == expected[prompt] for prompt, _, text in normal)
    assert all(status == 200 for who, status, _ in results if who == "hostile")
    assert engine.metrics.value("engram_batches_total") - batches_before < len(results)  # batches were shared


def test_a_prompt_past_the_character_limit_is_refused_before_tokenising(engine, client, keys, monkeypatch):
    def no_encode(prompt):
        raise AssertionError("a prompt past the character limit was tokenised")

    monkeypatch.setattr(engine, "encode", no_encode)
    limit = engine.max_prompt_chars
    assert limit == 32 * engine.context_length
    with pytest.raises(ValueError, match=f"prompt of {limit + 1} characters exceeds this server's limit of {limit} "
                                         "characters"):
        engine.prepare("z" * (limit + 1))
    response = client.post("/v1/completions", json={"prompt": "z" * (limit + 1)}, headers=bearer(keys.alpha))
    assert response.status_code == 400 and response.json()["error"]["message"] == (
        f"prompt of {limit + 1} characters exceeds this server's limit of {limit} characters")


def test_max_prompt_chars_is_checked(tiny_checkpoint):
    with pytest.raises(ValueError, match="max_prompt_chars must be >= 1"):
        Engine.from_checkpoint(tiny_checkpoint, device="cpu", max_prompt_chars=0)
    small = Engine.from_checkpoint(tiny_checkpoint, device="cpu", max_prompt_chars=10)
    assert small.max_prompt_chars == 10 and small.prepare("x" * 10).prompt_ids
    with pytest.raises(ValueError, match="prompt of 11 characters exceeds this server's limit of 10"):
        small.prepare("x" * 11)


def test_tokenising_runs_off_the_event_loop(engine, registry, keys, monkeypatch):
    """While one prompt is being tokenised, /health and other requests are answered."""
    real_encode = engine.encode
    entered, release, released = threading.Event(), threading.Event(), []

    def slow_encode(prompt):
        if prompt == "slow prompt":
            entered.set()
            released.append(release.wait(timeout=10))  # False: nothing ran while this blocked the event loop
        return real_encode(prompt)

    monkeypatch.setattr(engine, "encode", slow_encode)

    async def scenario():
        transport = httpx.ASGITransport(app=create_app(engine, registry))
        async with httpx.AsyncClient(transport=transport, base_url="http://engram", timeout=60) as client:
            slow = asyncio.create_task(client.post("/v1/completions", headers=bearer(keys.alpha),
                                                   json={"prompt": "slow prompt", "max_tokens": 2}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            health = await client.get("/health")
            other = await client.post("/v1/completions", headers=bearer(keys.beta),
                                      json={"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})
            release.set()
            return health, other, await slow

    health, other, slow = asyncio.run(scenario())
    assert health.status_code == 200 and other.status_code == 200 and slow.status_code == 200
    assert released == [True]
