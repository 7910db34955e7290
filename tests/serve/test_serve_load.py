"""A load test over loopback: a real uvicorn server, 200 requests from 20 concurrent clients across tenants."""

import asyncio
import json
import socket
import statistics
import threading
import time

import httpx
import pytest
import uvicorn

from engram.serve.app import create_app

from serve.serve_helpers import bearer, overlay_for, write_patch

pytestmark = pytest.mark.slow  # a load test of a live server: deselect with -m "not slow"

REQUESTS, CLIENTS, MAX_TOKENS = 200, 20, 4
PROMPTS = ("The zebra code is", "Once upon a time", "def main():", "the king and the queen")
BOUND_S = 120.0  # the whole run, on 2 shared CPU cores; about 10 s when they are free


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a thread."""

    def __init__(self, app):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


async def one_request(client: httpx.AsyncClient, key: str, prompt: str, stream: bool) -> tuple[float, str]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    started = time.perf_counter()
    if not stream:
        response = await client.post("/v1/completions", json=body, headers=bearer(key))
        assert response.status_code == 200, response.text
        return time.perf_counter() - started, response.json()["choices"][0]["text"]
    async with client.stream("POST", "/v1/completions", json=body, headers=bearer(key)) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    return time.perf_counter() - started, text


async def run_clients(base_url: str, keys: dict[str, str]) -> list[tuple[str, str, float, str]]:
    """``CLIENTS`` clients, each sending its share of ``REQUESTS`` one after another."""
    tenants = sorted(keys)

    async def client_loop(client_index: int) -> list[tuple[str, str, float, str]]:
        results = []
        async with httpx.AsyncClient(base_url=base_url, timeout=BOUND_S) as client:
            for request_index in range(client_index, REQUESTS, CLIENTS):
                tenant = tenants[request_index % len(tenants)]
                prompt = PROMPTS[(request_index // len(tenants)) % len(PROMPTS)]
                latency, text = await one_request(client, keys[tenant], prompt, stream=request_index % 5 == 0)
                results.append((tenant, prompt, latency, text))
        return results

    per_client = await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)))
    return [result for results in per_client for result in results]


def test_200_requests_from_20_concurrent_clients(engine, registry, keys, tmp_path, record_property, capsys):
    patch = write_patch(engine.model, tmp_path / "alpha.safetensors",
                        overlay_for(engine.model, engine.encode(PROMPTS[0]), seed=5))
    registry.set_patch("alpha", patch)
    batches_before = engine.metrics.value("engram_batches_total")
    with ServerThread(create_app(engine, registry)) as server:
        started = time.perf_counter()
        results = asyncio.run(run_clients(f"http://127.0.0.1:{server.port}", {"alpha": keys.alpha, "beta": keys.beta}))
        elapsed = time.perf_counter() - started
    latencies = sorted(latency for _, _, latency, _ in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    batches = engine.metrics.value("engram_batches_total") - batches_before
    report = (f"load test: {len(results)} requests ({MAX_TOKENS} tokens each) from {CLIENTS} clients in "
              f"{elapsed:.1f} s ({len(results) / elapsed:.1f} req/s, {batches:.0f} batches): "
              f"p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms, max {1000 * latencies[-1]:.0f} ms")
    with capsys.disabled():
        print(f"\n{report}")
    record_property("p50_ms", round(1000 * p50))
    record_property("p99_ms", round(1000 * p99))

    assert len(results) == REQUESTS and elapsed < BOUND_S
    assert batches < REQUESTS / 2  # requests did share batches
    # greedy text depends on the tenant and the prompt only, never on what shared the batch
    texts = {}
    for tenant, prompt, _, text in results:
        texts.setdefault((tenant, prompt), set()).add(text)
    assert all(len(variants) == 1 for variants in texts.values()), texts
    assert texts[("alpha", PROMPTS[0])] != texts[("beta", PROMPTS[0])]  # alpha's overlay is read, beta's not
