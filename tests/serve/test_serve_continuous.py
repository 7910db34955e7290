"""Continuous batching: requests join a running batch and leave it the step they finish; a slot serves the next
request at once; the text never depends on when a request joined, nor on the batching mode."""

import queue
import threading

import pytest
import torch

from engram.model import EngramLM
from engram.model.slots import SlotDecoder
from engram.serve.engine import Engine
from engram.tokenizer import load_tokenizer

from serve.serve_helpers import overlay_for

PROMPTS = ("The zebra code is", "Once upon a time", "def main():", "the king and the queen", "In the beginning")


def test_a_request_joins_a_running_one_and_both_get_their_text_alone(engine):
    long_request = engine.prepare(PROMPTS[0], max_tokens=60, temperature=0)
    short_request = engine.prepare(PROMPTS[1], max_tokens=5, temperature=0.8, seed=4)
    order = []
    long_inbox, short_inbox = queue.SimpleQueue(), queue.SimpleQueue()

    def recorder(name, inbox):
        def on_event(event):
            if event.finish_reason is not None:
                order.append(name)
            inbox.put(event)
        return on_event

    engine.submit(long_request, recorder("long", long_inbox))
    while (event := long_inbox.get(timeout=120)).text == "":  # the long request is decoding
        assert event.finish_reason is None
    engine.submit(short_request, recorder("short", short_inbox))
    events = {"long": [event], "short": []}
    for name, inbox in (("short", short_inbox), ("long", long_inbox)):
        while events[name] == [] or events[name][-1].finish_reason is None:
            events[name].append(inbox.get(timeout=120))
    assert order == ["short", "long"]  # the short one started and ended while the long one ran
    assert events["short"][-1].batch_size == 2 and events["long"][-1].batch_size == 1
    for name, request in (("long", long_request), ("short", short_request)):
        alone = engine.complete(request)
        text = "".join(event.text for event in events[name])
        assert (text, events[name][-1].completion_tokens) == (alone.text, alone.completion_tokens), name


@pytest.fixture(scope="module")
def two_slot_engine(tiny_checkpoint):
    with Engine.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=2, batch_window_s=0.01,
                                max_tokens_limit=64) as running:
        yield running


def test_more_requests_than_slots_reuse_the_slots_as_they_free(two_slot_engine, engine):
    """Five requests of different lengths through two slots: each freed slot takes the next request at once, and
    every request gets the text the large engine gives it alone."""
    overlay = overlay_for(engine.model, engine.encode(PROMPTS[2]), seed=3)
    requests = [two_slot_engine.prepare(prompt, max_tokens=tokens, temperature=temperature, seed=seed,
                                        overlay=overlay if index == 2 else None)
                for index, (prompt, tokens, temperature, seed) in enumerate(zip(
                    PROMPTS, (12, 3, 7, 5, 9), (0, 0.9, 0, 1.0, 0), (None, 1, None, 2, None)))]
    before = two_slot_engine.metrics.value("engram_batches_total")
    together = two_slot_engine.complete_many(requests)
    assert two_slot_engine.metrics.value("engram_batches_total") - before >= 3  # later requests joined later
    assert [c.completion_tokens for c in together] == [r.max_tokens for r in requests]
    assert max(c.batch_size for c in together) == 2
    for request, completion in zip(requests, together):
        assert completion.text == engine.complete(request).text


def test_static_batching_gives_the_same_text(tiny_checkpoint, engine):
    requests = [engine.prepare(PROMPTS[0], max_tokens=6, temperature=0),
                engine.prepare(PROMPTS[3], max_tokens=8, temperature=0.9, top_p=0.8, seed=5),
                engine.prepare(PROMPTS[4], max_tokens=4, temperature=1.2, seed=6)]
    with Engine.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=4, decode="eager") as static:
        assert static.decode == "eager" and engine.decode == "static"
        assert [c.text for c in static.complete_many(requests)] == [c.text for c in engine.complete_many(requests)]


def test_a_failing_step_hands_its_rows_to_static_batching(engine, monkeypatch):
    """A step that raises fails no request: the running rows go on from the tokens they have, with static batching."""
    requests = [engine.prepare(PROMPTS[1], max_tokens=8, temperature=0),
                engine.prepare(PROMPTS[2], max_tokens=6, temperature=0.7, seed=8)]
    expected = [c.text for c in engine.complete_many(requests)]
    real_step, calls = SlotDecoder.step, []

    def step_failing_once(self, rows=None):
        calls.append(rows)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return real_step(self, rows)

    monkeypatch.setattr(SlotDecoder, "step", step_failing_once)
    errors_before = engine.metrics.value("engram_engine_errors_total")
    completions = engine.complete_many(requests)
    assert [c.finish_reason for c in completions] == ["length", "length"], [c.error for c in completions]
    assert [c.text for c in completions] == expected
    assert engine.metrics.value("engram_engine_errors_total") == errors_before + 1
    assert len(calls) == 3  # the rest ran with static batching


def test_closing_finishes_the_running_rows_and_fails_the_queued(tiny_checkpoint):
    closing = Engine.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=1, max_tokens_limit=64).start()
    first, second = queue.SimpleQueue(), queue.SimpleQueue()
    closing.submit(closing.prepare(PROMPTS[0], max_tokens=30, temperature=0), first.put)
    closing.submit(closing.prepare(PROMPTS[1], max_tokens=3, temperature=0), second.put)
    while first.get(timeout=120).text == "":
        pass
    closer = threading.Thread(target=closing.close)
    closer.start()
    closer.join(timeout=120)
    assert not closer.is_alive() and not closing.alive
    while (event := first.get(timeout=5)).finish_reason is None:
        pass
    assert event.finish_reason == "length" and event.completion_tokens == 30
    assert second.get(timeout=5).error == "the server is shutting down"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_on_a_gpu_the_graph_replayed_step_serves_the_same_text(tiny_checkpoint):
    model = EngramLM.from_pretrained(tiny_checkpoint).to("cuda", torch.bfloat16)
    tokenizer = load_tokenizer(model.cfg.tokenizer)
    with Engine(model, tokenizer, max_batch=8, decode="auto") as graphs, \
            Engine(model, tokenizer, max_batch=8, decode="static") as steps:
        assert graphs.decode == "graph"
        requests = [graphs.prepare(prompt, max_tokens=6 + index, temperature=0.9 * (index % 2), seed=index)
                    for index, prompt in enumerate(PROMPTS)]
        assert [c.text for c in graphs.complete_many(requests)] == [c.text for c in steps.complete_many(requests)]


@pytest.mark.parametrize("join_every, order", [(1, ["short", "long"]), (1000, ["long", "short"])])
def test_join_every_holds_waiting_requests_back_while_rows_run(tiny_checkpoint, join_every, order):
    """A request arriving while a row decodes joins at the next step with join_every=1, and only once the running
    batch has emptied when join_every exceeds the running row's length."""
    with Engine.from_checkpoint(tiny_checkpoint, device="cpu", max_batch=4, join_every=join_every) as engine:
        long_request = engine.prepare(PROMPTS[0], max_tokens=40, temperature=0)
        short_request = engine.prepare(PROMPTS[1], max_tokens=3, temperature=0)
        finished, started, both = [], threading.Event(), threading.Event()

        def recorder(name):
            def on_event(event):
                started.set()
                if event.finish_reason is not None:
                    finished.append(name)
                    if len(finished) == 2:
                        both.set()
            return on_event

        engine.submit(long_request, recorder("long"))
        assert started.wait(timeout=120)  # the long request is decoding
        engine.submit(short_request, recorder("short"))
        assert both.wait(timeout=120)
        assert finished == order


def test_join_every_must_be_positive(tiny_checkpoint):
    model = EngramLM.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="join_every.*got 16, 1024, 512, 0"):
        Engine(model, load_tokenizer(model.cfg.tokenizer), join_every=0)
