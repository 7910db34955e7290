"""The engine: mixed-tenant batches read each row's own overlay, rows finish on their own, text streams exactly."""

import queue

import pytest

from engram.serve.engine import GenerationRequest, TextStream
from engram.tokenizer import load_tokenizer

from serve.serve_helpers import overlay_for

PROMPTS = ("The zebra code is", "Once upon a time", "def main():", "Alexander the Great could tame")


def test_mixed_tenant_batch_matches_each_request_alone(engine):
    """Tenants share one batch; each row reads its own overlay and produces what its tenant alone would."""
    overlays = [overlay_for(engine.model, engine.encode(prompt), seed=i) for i, prompt in enumerate(PROMPTS[:2])]
    requests = [
        engine.prepare(PROMPTS[0], max_tokens=6, temperature=0, overlay=overlays[0], tenant="a"),
        engine.prepare(PROMPTS[1], max_tokens=9, temperature=0, overlay=overlays[1], tenant="b"),
        engine.prepare(PROMPTS[2], max_tokens=5, temperature=0),  # the base memory
        engine.prepare(PROMPTS[0], max_tokens=6, temperature=0),  # a's prompt without a's overlay
        engine.prepare(PROMPTS[3], max_tokens=7, temperature=0.9, top_p=0.8, seed=11, overlay=overlays[0]),
    ]
    together = engine.complete_many(requests)
    assert [c.batch_size for c in together] == [len(requests)] * len(requests)
    for request, completion in zip(requests, together):
        alone = engine.complete(request)
        assert alone.batch_size == 1
        assert (completion.text, completion.completion_tokens) == (alone.text, alone.completion_tokens)
        assert completion.finish_reason == alone.finish_reason
    # the overlays are read: a's prompt gives another text under a's overlay than under the base tables
    assert together[0].text != together[3].text
    assert [c.completion_tokens for c in together] == [r.max_tokens for r in requests]


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    seeded = engine.prepare(PROMPTS[1], max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    others = [engine.prepare(prompt, max_tokens=4, temperature=1.0) for prompt in PROMPTS]
    alone = engine.complete(seeded).text
    assert engine.complete_many([*others[:2], seeded, *others[2:]])[2].text == alone
    assert engine.complete(seeded).text == alone


def test_stop_strings_cut_the_text(engine):
    request = engine.prepare(PROMPTS[0], max_tokens=12, temperature=0)
    full = engine.complete(request).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = engine.complete(engine.prepare(PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "\x00never"]))
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_cancelled_request_ends_and_worker_goes_on(engine):
    inbox = queue.SimpleQueue()
    job = engine.submit(engine.prepare(PROMPTS[0], max_tokens=60, temperature=0), inbox.put)
    assert inbox.get(timeout=60).finish_reason is None  # the row is decoding
    job.cancel()
    while (event := inbox.get(timeout=60)).finish_reason is None:
        pass
    assert event.finish_reason == "cancelled" and event.completion_tokens < 60
    assert engine.complete(engine.prepare(PROMPTS[1], max_tokens=3, temperature=0)).finish_reason == "length"


def test_failing_batch_reports_an_error_and_worker_goes_on(engine, monkeypatch):
    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    request = engine.prepare(PROMPTS[0], max_tokens=3, temperature=0)
    monkeypatch.setattr(engine.model, "forward", broken_forward)
    failed = engine.complete_many([request, request])
    monkeypatch.undo()
    assert [c.finish_reason for c in failed] == ["error", "error"]
    assert "simulated device failure" in failed[0].error
    assert engine.alive and engine.complete(request).finish_reason == "length"


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", 0, "max_tokens must be in"),
    ("max_tokens", 10**12, "1000000000000"),
    ("temperature", -0.5, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("stop", ["a", "b", "c", "d", "e"], "at most 4"),
    ("stop", [""], "non-empty"),
    ("seed", -1, "seed"),
], ids=["max-tokens-0", "max-tokens-huge", "temperature", "top-p", "stops-5", "stop-empty", "seed"])
def test_prepare_refuses_bad_values(engine, field, value, message):
    with pytest.raises(ValueError, match=message):
        engine.prepare("hello", **{field: value})


def test_prompt_past_the_context_is_refused_with_lengths(engine):
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens \+ max_tokens 16 = \d+ tokens exceeds the model's "
                                         r"context of 512 tokens"):
        engine.prepare("word " * 600, max_tokens=16)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("deepseek-v3")


@pytest.mark.parametrize("text, stop, expected", [
    ("Hello world, the zebra code is 4217. Bye", ("4217",), "Hello world, the zebra code is "),
    ("Zebras 🦓 and café ☕ are fine.", (), "Zebras 🦓 and café ☕ are fine."),
    ("one two three four", ("three", "two three"), "one "),
    ("no stop here at all", ("zzz",), "no stop here at all"),
], ids=["stop-mid", "multibyte", "two-stops", "unmatched-stop"])
def test_text_stream_deltas_add_up_to_the_final_text(tokenizer, text, stop, expected):
    stream = TextStream(tokenizer, stop)
    pieces = []
    for token_id in tokenizer.encode(text, add_special_tokens=False).ids:
        piece, stopped = stream.push(token_id)
        assert "\ufffd" not in piece
        if stop:
            assert not any(s in "".join(pieces) + piece for s in stop)
        pieces.append(piece)
        if stopped:
            break
    else:
        pieces.append(stream.flush())
    assert "".join(pieces) == expected


def test_generation_request_is_immutable(engine):
    request = engine.prepare("hi", max_tokens=2)
    assert isinstance(request, GenerationRequest) and request.prompt_ids[0] == engine.bos_id
    with pytest.raises(AttributeError):
        request.max_tokens = 3
