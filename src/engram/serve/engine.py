"""The server's inference engine: one model shared by every tenant, one worker thread, continuous batching.

Requests wait in a queue. The worker keeps a running batch in the slots of a :class:`~engram.model.slots.SlotDecoder`
(``max_batch`` of them): waiting requests join while slots are free (their prompts prefilled together, one
``EngramLM.forward``, copied into their slots) and finished ones leave, their slot free for the next request at once. A
prefill stalls every running row, so while rows run, requests join at most once every ``join_every`` decode steps,
together (one prefill instead of one per request; the TGI server's ``max_waiting_tokens`` is the same idea); a request
that arrives after a longer pause joins at the next step. When nothing runs, the first request waits ``batch_window_s``
for company. A step samples every row on the device and runs the sync-free decode step, replayed from CUDA graphs on a
GPU (``decode="graph"``; ``"static"`` runs it op by op); the host reads the tokens of step t while the device runs step
t + 1. Each slot reads its own tenant's :class:`RowOverlay` (the model's tables are never changed). Rows have their own
``max_tokens``, temperature, top-p, seed and stop strings and finish independently. ``decode="eager"`` is static
batching instead: a batch of up to ``max_batch`` requests runs one prefill and one decode loop
(:class:`~engram.model.generation.Decoding`) to its last row, inside :func:`~engram.model.overlay.row_overlays`;
requests arriving meanwhile wait for the next batch.

Every row reports through a callback: one :class:`GenerationEvent` per new piece of text, the last one with a
``finish_reason``.

One request never fails another. :meth:`Engine.prepare` refuses bad parameters and makes temperatures below
:data:`~engram.model.sampling.GREEDY_BELOW` greedy before a request is queued; a request whose overlay the model
cannot read fails alone when it would join; a row whose scores come out NaN or infinite is failed alone at that
step. Should a prefill or a step still raise, the rows it held are run on with static batching from the tokens they
have: split in halves, each half a batch of its own (recursively, down to single rows), so that only a row that fails
alone gets ``finish_reason="error"``, with its own exception's text; the others finish with the text they would have
had (greedy rows exactly, up to the rounding of a fresh prefill). Sampling draws from each row's own seeded stream
(:func:`~engram.model.sampling.sample_rows`) in both batching modes, so a seeded request samples the same text
whatever shares its batch, and across such a fallback.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from engram.data.corpus import bos_id
from engram.memory.patch import load_patch, model_fingerprint
from engram.model import EngramLM
from engram.model.generation import Decoding, graph_blockers, resolve_decode, vocab_limit
from engram.model.overlay import RowOverlay, check_row_overlays, row_overlays
from engram.model.sampling import GREEDY_BELOW, RowSampling, SamplingTensors, sample_rows, sampling_mode
from engram.model.slots import SlotDecoder, StepTokens
from engram.parallel.distributed import resolve_device
from engram.serve.metrics import Metrics
from engram.tokenizer import load_tokenizer

logger = logging.getLogger("engram.serve")

MAX_STOP_STRINGS = 4  # as OpenAI's API
# Default prompt bound in characters per token of context: checked before tokenising, far above real text
# (~4 characters a token) so that no prompt that fits the context is refused by it.
PROMPT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to run; build it with :meth:`Engine.prepare`, which checks every field."""

    prompt_ids: tuple[int, ...]  # BOS first
    max_tokens: int
    temperature: float = 1.0  # 0: greedy (prepare turns any temperature below GREEDY_BELOW into 0)
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these; it is not returned
    seed: int | None = None  # a seeded request samples the same text whatever shares its batch
    overlay: RowOverlay | None = field(default=None, repr=False)  # the tenant's memory; None: the base
    tenant: str = ""  # for metrics


@dataclass(frozen=True)
class GenerationEvent:
    """New text of one request; the last event has ``finish_reason`` and the token counts."""

    text: str
    finish_reason: str | None = None  # "stop" (stop string or end of document), "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0  # rows of the batch the request ran in
    error: str | None = None  # with finish_reason "error"


@dataclass(frozen=True)
class Completion:
    """A finished request, as :meth:`Engine.complete` returns it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    error: str | None = None


class EngineBusy(RuntimeError):
    """The queue is full: try again later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or its worker is gone."""


class Job:
    """A submitted request: :meth:`cancel` stops it at the next decode step (its row then idles)."""

    def __init__(self, request: GenerationRequest, on_event: Callable[[GenerationEvent], None]):
        self.request = request
        self.submitted = time.perf_counter()
        self._on_event = on_event
        self._cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: GenerationEvent) -> None:
        """Hand ``event`` to the callback; a failing callback (a closed event loop) cancels the job."""
        if event.finish_reason is not None:
            self.finished = True
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - the consumer is gone; the other rows must go on
            logger.exception("a request's event callback failed; the request is cancelled")
            self.cancel()


class TextStream:
    """Token ids -> text deltas of one row: holds back a tail that may start a stop string or end mid-character.

    The concatenated deltas always equal the final text (the decoded completion, cut before a stop string).

    Example:
        >>> stream = TextStream(load_tokenizer("deepseek-v3"), stop=("\n\n",))  # doctest: +SKIP
        >>> [stream.push(token_id) for token_id in (67, 291, 271)]  # "a", " b", "\n\n"  # doctest: +SKIP
        [('a', False), (' b', False), ('', True)]
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text safe to send, whether a stop string was reached)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            search_from = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                return self._take(text, min(hits)), True
        # an incomplete UTF-8 sequence decodes to U+FFFD until the next token completes it: hold it back
        safe = len(text.rstrip("\ufffd"))
        held = max((size for stop in self.stop for size in range(1, min(len(stop) - 1, safe) + 1)
                    if text[safe - size:safe] == stop[:size]), default=0)  # a tail that may grow into a stop
        return self._take(text, max(safe - held, self.sent)), False

    def flush(self) -> str:
        """Whatever was held back (the row ended without a stop string)."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.sent:end]
        self.sent += len(piece)
        return piece


@dataclass
class _Row:
    """One request's state while it runs."""

    job: Job
    text: TextStream
    seed: int  # the request's seed, or one drawn for it: its sampling stream in either batching mode
    ids: list[int] = field(default_factory=list)  # the tokens generated so far
    done: bool = False
    batch: int = 0  # rows of the batch it ran in (continuous batching: when it joined)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def context(self) -> list[int]:
        """The prompt and the tokens generated so far: what a row resumed in another batch prefills."""
        return [*self.job.request.prompt_ids, *self.ids]

    @property
    def sampling(self) -> RowSampling:
        request = self.job.request
        return RowSampling(request.temperature, None, request.top_p if request.top_p < 1 else None, self.seed)


@dataclass(frozen=True)
class _Launched:
    """A step queued on the device: the rows of the slots it ran, and its tokens on their way to the host."""

    rows: dict[int, _Row]
    out: StepTokens


class Engine:
    """A model, its tokenizer and the worker thread that batches requests (see the module docstring).

    Example:
        >>> with Engine.from_checkpoint("runs/tiny/final") as engine:  # doctest: +SKIP
        ...     engine.complete(engine.prepare("The capital of France is", max_tokens=8, temperature=0)).text
    """

    def __init__(self, model: EngramLM, tokenizer: Tokenizer, model_name: str = "engram", max_batch: int = 16,
                 batch_window_s: float = 0.005, max_tokens_limit: int = 512, max_queue: int = 1024,
                 max_prompt_chars: int | None = None, metrics: Metrics | None = None, decode: str = "auto",
                 join_every: int = 16):
        if max_batch < 1 or max_queue < 1 or max_tokens_limit < 1 or join_every < 1 or batch_window_s < 0 or (
                max_prompt_chars is not None and max_prompt_chars < 1):
            raise ValueError(f"max_batch, max_queue, max_tokens_limit, join_every and max_prompt_chars must be >= 1 "
                             f"and batch_window_s >= 0, got {max_batch}, {max_queue}, {max_tokens_limit}, "
                             f"{join_every}, {max_prompt_chars} and {batch_window_s}")
        self.model = model.eval()
        # "auto": the graph-captured step where possible, the same step op by op elsewhere (continuous batching
        # everywhere); "eager": static batching with the plain decode loop.
        self.decode = (("static" if graph_blockers(model) else "graph") if decode == "auto"
                       else resolve_decode(model, decode))
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.join_every = join_every
        self.max_queue = max_queue
        self.context_length = model.cfg.max_position_embeddings
        self.max_tokens_limit = min(max_tokens_limit, self.context_length - 1)
        self.max_prompt_chars = max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.context_length
        self.metrics = metrics or Metrics()
        self.bos_id = bos_id(tokenizer)
        self.device = model.embed.weight.device
        self._pending: collections.deque[Job] = collections.deque()
        self._wakeup = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None
        # made now, so that a model the slots cannot serve is refused here rather than in the worker
        self._continuous = _ContinuousBatching(self) if self.decode != "eager" else None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike[str], device: str = "auto", model_name: str | None = None,
                        **options) -> "Engine":
        """Load a ``save_pretrained`` folder on ``device`` with its tokenizer; ``options`` go to :class:`Engine`."""
        model = EngramLM.from_pretrained(checkpoint).to(resolve_device(device))
        return cls(model, load_tokenizer(model.cfg.tokenizer), model_name or Path(checkpoint).resolve().name,
                   **options)

    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> ids, BOS first (documents start with BOS in training)."""
        return [self.bos_id] + self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def prepare(self, prompt: str, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                stop: str | Sequence[str] | None = None, seed: int | None = None,
                overlay: RowOverlay | None = None, tenant: str = "") -> GenerationRequest:
        """A checked :class:`GenerationRequest`; ``ValueError`` naming the bad value (and lengths) otherwise.

        The prompt's length in characters is checked (``max_prompt_chars``) before it is tokenised; tokenising
        takes milliseconds per 10 kB, so call this off an event loop. A temperature below
        :data:`~engram.model.sampling.GREEDY_BELOW` becomes 0 (greedy).
        """
        if len(prompt) > self.max_prompt_chars:
            raise ValueError(f"prompt of {len(prompt)} characters exceeds this server's limit of "
                             f"{self.max_prompt_chars} characters")
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_tokens must be in [1, {self.max_tokens_limit}] on this server, got {max_tokens}")
        if not 0 <= temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
                             f"got {stop!r}")
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        ids = self.encode(prompt)
        if len(ids) + max_tokens > self.context_length:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = {len(ids) + max_tokens} "
                             f"tokens exceeds the model's context of {self.context_length} tokens")
        temperature = 0.0 if temperature < GREEDY_BELOW else float(temperature)
        return GenerationRequest(tuple(ids), max_tokens, temperature, float(top_p), stops, seed, overlay, tenant)

    def load_overlay(self, path: str | os.PathLike[str]) -> RowOverlay:
        """A memory patch file as an overlay on this engine's device.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the patch is refused: truncated or corrupt, made for another base model, or gate-tuned
                (it replaces dense tensors, which an overlay cannot).
        """
        return load_patch(path, model=self.model, fingerprint=self.base_fingerprint).overlay().to(self.device)

    @functools.cached_property
    def base_fingerprint(self) -> str:
        """The served model's :func:`~engram.memory.patch.model_fingerprint`, hashed once: tenants' overlays
        never change the base model, and hashing every weight per patch load would take seconds on a big one."""
        return model_fingerprint(self.model)

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> "Engine":
        """Start the worker thread (once)."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="engram-engine", daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        """Finish the running batch, fail the queued requests, stop the worker."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify_all()
        if self._worker is not None:
            self._worker.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, request: GenerationRequest, on_event: Callable[[GenerationEvent], None]) -> Job:
        """Queue ``request``; ``on_event`` is called from the worker thread. ``EngineBusy`` when the queue is full."""
        return self.submit_many([request], [on_event])[0]

    def submit_many(self, requests: Sequence[GenerationRequest],
                    on_events: Sequence[Callable[[GenerationEvent], None]]) -> list[Job]:
        """Queue several requests at once: with nothing else waiting, up to ``max_batch`` of them share a batch."""
        jobs = [Job(request, on_event) for request, on_event in zip(requests, on_events, strict=True)]
        with self._wakeup:
            if self._closing or not self.alive:
                raise EngineClosed("the engine is not running")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise EngineBusy(f"the server's queue is full ({self.max_queue} requests); retry later")
            self._pending.extend(jobs)
            self.metrics.set("engram_queue_depth", len(self._pending))
            self._wakeup.notify()
        return jobs

    def complete(self, request: GenerationRequest) -> Completion:
        """Run ``request`` and wait for it (from any thread but the worker)."""
        return self.complete_many([request])[0]

    def complete_many(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Run requests submitted together (one batch when they fit ``max_batch`` and nothing else waits) and wait
        for all of them."""
        inboxes: list[queue.SimpleQueue[GenerationEvent]] = [queue.SimpleQueue() for _ in requests]
        self.submit_many(requests, [inbox.put for inbox in inboxes])
        completions = []
        for inbox in inboxes:
            pieces = []
            while (event := inbox.get()).finish_reason is None:
                pieces.append(event.text)
            pieces.append(event.text)
            completions.append(Completion("".join(pieces), event.finish_reason, event.prompt_tokens,
                                          event.completion_tokens, event.batch_size, event.error))
        return completions

    def _take_jobs(self, free: int, idle: bool) -> list[Job] | None:
        """Up to ``free`` waiting requests; None when the engine closes and nothing is ``idle``-waiting to finish.

        ``idle`` (nothing runs): block until a request waits, then collect more for up to ``batch_window_s``. Requests
        cancelled while they waited get their last event here and are left out (the list may be empty). While the
        engine closes, running rows still finish, but no request joins them.
        """
        with self._wakeup:
            if idle:
                while not self._pending and not self._closing:
                    self._wakeup.wait()
                if not self._closing:
                    deadline = time.perf_counter() + self.batch_window_s
                    while len(self._pending) < free and (left := deadline - time.perf_counter()) > 0:
                        self._wakeup.wait(left)
            if self._closing:
                return None if idle else []
            jobs = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
            self.metrics.set("engram_queue_depth", len(self._pending))
        live = []
        for job in jobs:
            if job.cancelled:
                job.emit(GenerationEvent("", "cancelled", len(job.request.prompt_ids)))
            else:
                live.append(job)
        return live

    def _work(self) -> None:
        try:
            if self._continuous is None:
                while (jobs := self._take_jobs(self.max_batch, idle=True)) is not None:
                    if jobs:
                        self._run_jobs(jobs)
            else:
                self._continuous.run()
        finally:
            with self._wakeup:
                leftover, self._pending = list(self._pending), collections.deque()
            for job in leftover:
                job.emit(GenerationEvent("", "error", len(job.request.prompt_ids),
                                         error="the server is shutting down"))

    def _run_jobs(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` as one batch (:meth:`_run_isolated`); the worker survives whatever happens."""
        try:
            rows = [self._start_row(job) for job in jobs]
            with torch.inference_mode():
                self._run_isolated(rows)
        except Exception:  # noqa: BLE001 - a bug in the bookkeeping must not stop the server
            self._fail_unfinished(jobs, "batch")

    def _fail_unfinished(self, jobs: Sequence[Job], what: str) -> None:
        """Give every unfinished job of ``jobs`` a generic error after a failure outside decoding (logged)."""
        logger.exception("%s of %d requests failed outside decoding", what, len(jobs))
        self.metrics.inc("engram_engine_errors_total")
        for job in jobs:  # no exception text: it need not be this request's
            if not job.finished:
                job.emit(GenerationEvent("", "error", len(job.request.prompt_ids), batch_size=len(jobs),
                                         error="internal server error (see the server's log)"))

    def _start_row(self, job: Job) -> _Row:
        self.metrics.observe("engram_queue_wait_seconds", time.perf_counter() - job.submitted)
        seed = job.request.seed if job.request.seed is not None else secrets.randbits(63)
        return _Row(job, TextStream(self.tokenizer, job.request.stop), seed)

    def _run_isolated(self, rows: list[_Row]) -> None:
        """Decode ``rows`` as one batch. When it raises, the rows still running are split in halves, each run
        on as a batch of its own from the tokens it has, recursively: a row that fails alone gets its own
        error; no row gets another's."""
        try:
            self._run_batch(rows)
            return
        except Exception as err:  # noqa: BLE001 - one failing row must not fail the others
            self.metrics.inc("engram_engine_errors_total")
            live = [row for row in rows if not row.done]
            if len(live) <= 1:
                for row in live:
                    logger.exception("request failed alone (tenant %r)", row.job.request.tenant)
                    self._finish(row, "", "error", 1, error=f"{type(err).__name__}: {err}")
                return
            logger.warning("batch of %d rows failed (%s: %s); %d running rows retried in halves", len(rows),
                           type(err).__name__, err, len(live))
        half = len(live) // 2
        self._run_isolated(live[:half])
        self._run_isolated(live[half:])

    def _run_batch(self, rows: list[_Row]) -> None:
        """One batched prefill of every row's :attr:`_Row.context` and a decode loop over them (a
        :class:`Decoding`, sampled and stopped per row) until every row is done."""
        batch = len(rows)
        self.metrics.inc("engram_batches_total")
        self.metrics.observe("engram_batch_size", batch)
        for row in rows:
            row.batch = batch
        ids, mask = self._left_padded([row.context for row in rows])
        overlays = [row.job.request.overlay for row in rows]
        tenants_memory = (row_overlays(self.model, overlays, self.device)
                          if any(overlay is not None for overlay in overlays) else contextlib.nullcontext())
        max_new = max(row.job.request.max_tokens - row.tokens for row in rows)
        with tenants_memory:
            decoding = Decoding(self.model, ids, max_new, mask)
            while True:  # every row ends by its max_tokens, within the cache (which refuses to overflow)
                next_ids, broken = self._sample(decoding.logits, rows)
                for row, token_id, is_broken in zip(rows, next_ids.tolist(), broken.tolist()):
                    if not row.done:
                        self._take_token(row, token_id, is_broken)
                if all(row.done for row in rows):
                    return
                decoding.step(next_ids)

    def _left_padded(self, contexts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists as one left-padded batch: ``(ids [B, T], attention_mask [B, T])`` on the engine's device."""
        width = max(len(context) for context in contexts)
        ids = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for index, context in enumerate(contexts):
            ids[index, width - len(context):] = torch.tensor(context)
            mask[index, width - len(context):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, V]`` -> ``([B] next ids, [B] broken rows)``, every row with its own parameters and seeded stream at
        its own token count (:func:`~engram.model.sampling.sample_rows`: what a slot step draws)."""
        sampling = [row.sampling for row in rows]
        counters = torch.tensor([row.tokens for row in rows], device=logits.device)
        mode = sampling_mode(row.sampling for row in rows if not row.done)
        return sample_rows(logits, SamplingTensors.of(sampling, logits.device), counters, vocab_limit(self.model),
                           mode)

    def _take_token(self, row: _Row, token_id: int, broken: bool) -> None:
        """Hand ``row`` its next token, or fail it alone when its scores were NaN or infinite."""
        if broken:
            self._finish(row, "", "error", row.batch, error="the model's scores for this request are NaN or infinite")
        else:
            self._advance(row, token_id, row.batch)

    def _advance(self, row: _Row, token_id: int, batch: int) -> None:
        """Take ``token_id`` into ``row``: emit its text, finish it on a stop, the end of the document or
        ``max_tokens``, or when its job was cancelled."""
        job, request = row.job, row.job.request
        if job.cancelled:
            self._finish(row, "", "cancelled", batch)
            return
        if row.tokens == 0:
            self.metrics.observe("engram_time_to_first_token_seconds", time.perf_counter() - job.submitted)
        row.ids.append(token_id)
        if token_id == self.bos_id:  # a new document begins: this one is over
            reason, text = "stop", row.text.flush()
        else:
            text, stopped = row.text.push(token_id)
            reason = "stop" if stopped else "length" if row.tokens == request.max_tokens else None
            if reason == "length":
                text += row.text.flush()
        if reason is None:
            if text:
                job.emit(GenerationEvent(text))
            return
        self._finish(row, text, reason, batch)

    def _finish(self, row: _Row, text: str, reason: str, batch: int, error: str | None = None) -> None:
        """End ``row`` with its last event (``error``: this row's own failure, with ``reason`` "error")."""
        request = row.job.request
        row.done = True
        self.metrics.inc("engram_prompt_tokens_total", len(request.prompt_ids), tenant=request.tenant)
        self.metrics.inc("engram_completion_tokens_total", row.tokens, tenant=request.tenant)
        row.job.emit(GenerationEvent(text, reason, len(request.prompt_ids), row.tokens, batch, error))


class _ContinuousBatching:
    """The worker's loop with continuous batching (see the module doc): the running batch lives in the slots of a
    :class:`~engram.model.slots.SlotDecoder`; requests join between any two steps while slots are free and leave the
    step they finish; on a CUDA device the host reads step t's tokens while the device runs step t + 1."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.decoder = self._new_decoder()
        self.running: dict[int, _Row] = {}  # slot -> its row
        # a CUDA device runs step t + 1 while the host reads step t; on the CPU a step is done when launched, and
        # reading it at once saves a step of latency per token
        self.overlap = engine.device.type == "cuda"
        self.head_dims = {block.layer_idx: block.engram.multi_head_embedding.head_dim
                          for block in engine.model.blocks if block.engram is not None}

    def _new_decoder(self) -> SlotDecoder:
        engine = self.engine
        return SlotDecoder(engine.model, engine.max_batch, engine.context_length,
                           cuda_graphs=engine.decode == "graph")

    def run(self) -> None:
        """Serve until the engine closes and the running rows have finished."""
        launched: _Launched | None = None
        idle = True
        steps_since_join = self.engine.join_every  # the first requests join at once
        while (jobs := self.engine._take_jobs(self._room(idle, steps_since_join), idle)) is not None:
            try:
                with torch.inference_mode():
                    if jobs:
                        self._admit(jobs)
                        steps_since_join = 0
                    queued = self._launch() if self.running else None
                    steps_since_join += queued is not None
                    if launched is not None:
                        self._collect(launched)
                    launched = queued
                    if launched is not None and not self.overlap:
                        self._collect(launched)
                        launched = None
            except Exception:  # noqa: BLE001 - a bug in the bookkeeping must not stop the server
                self.engine._fail_unfinished([*jobs, *(row.job for row in self.running.values())], "decode step")
                self.running.clear()
                self.decoder = self._new_decoder()
                launched = None
            idle = not self.running and launched is None

    def _room(self, idle: bool, steps_since_join: int) -> int:
        """How many waiting requests may join now: the free slots when nothing runs or ``join_every`` steps have
        passed since the last join, else none."""
        if idle or steps_since_join >= self.engine.join_every:
            return self.engine.max_batch - len(self.running)
        return 0

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` together into free slots. A request whose overlay the model cannot read fails alone; when
        the prefill raises, the joining requests run with static batching instead (:meth:`Engine._run_isolated`)."""
        engine = self.engine
        joining = []
        for row in (engine._start_row(job) for job in jobs):
            try:
                check_row_overlays([row.job.request.overlay], self.head_dims)
            except ValueError as err:
                engine.metrics.inc("engram_engine_errors_total")
                engine._finish(row, "", "error", 1, error=f"{type(err).__name__}: {err}")
            else:
                joining.append(row)
        if not joining:
            return
        slots = self.decoder.free_slots()[:len(joining)]
        ids, mask = engine._left_padded([row.context for row in joining])
        try:
            self.decoder.admit(slots, ids, mask, [row.sampling for row in joining], [row.tokens for row in joining],
                               [row.job.request.overlay for row in joining])
        except Exception as err:  # noqa: BLE001 - one failing request must not fail the others
            logger.warning("prefill of %d joining requests failed (%s: %s); they run with static batching",
                           len(joining), type(err).__name__, err)
            engine._run_isolated(joining)
            return
        size = len(self.running) + len(joining)
        engine.metrics.inc("engram_batches_total")
        engine.metrics.observe("engram_batch_size", size)
        for slot, row in zip(slots, joining):
            row.batch = size
            self.running[slot] = row

    def _launch(self) -> _Launched | None:
        """Queue one step of the running batch and the copy of its tokens to the host."""
        rows = self.decoder.rows_for_step()
        try:
            self.decoder.step(rows)
            return _Launched(dict(self.running), self.decoder.copy_out(rows))
        except Exception as err:  # noqa: BLE001 - one failing request must not fail the others
            self._step_failed(err)
            return None

    def _collect(self, launched: _Launched) -> None:
        """Hand every row of ``launched`` its token; a row that finishes leaves its slot at once."""
        try:
            tokens, broken = launched.out.read()
        except Exception as err:  # noqa: BLE001 - one failing request must not fail the others
            self._step_failed(err)
            return
        for slot, row in launched.rows.items():
            if row.done:  # finished in an earlier step: this step ran its slot for nothing
                continue
            self.engine._take_token(row, tokens[slot], broken[slot])
            if row.done:
                del self.running[slot]
                self.decoder.release([slot])

    def _step_failed(self, err: Exception) -> None:
        """A step raised: nothing tells which row caused it, so every running row leaves its slot and runs on with
        static batching from the tokens it has, bisected until a row that fails alone gets the error."""
        engine = self.engine
        engine.metrics.inc("engram_engine_errors_total")
        rows = [row for row in self.running.values() if not row.done]
        logger.warning("decode step of %d rows failed (%s: %s); they run on with static batching", len(rows),
                       type(err).__name__, err)
        self.decoder.release(list(self.running))
        self.running.clear()
        engine._run_isolated(rows)
