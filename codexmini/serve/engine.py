"""The engine: it owns a model's `Runtime` and runs every request on it (continuous batching), on a worker thread
that a server's models share (`Worker`).

Requests wait in a bounded queue (full: `QueueFull`, which the app answers with 503 and Retry-After) and are
admitted as slots free up, at most `parallel` at a time. Each admitted request gets its own session, forked from the
prefix cache where an earlier request shared its beginning. Every step of the loop then
1. drops the sequences whose client went away (their slot is free for the next step),
2. decodes one token for every sequence past its prompt in one forward, samples each with its own parameters and
   generator, and sends the text on: with the next chunks of the prompts still prefilling (up to `prefill_chunk`
   tokens in all) when there are any (`Runtime.prefill_batch`, the decoding tokens one-row chunks beside them where
   the kernels compute every row as alone: a long prompt delays the others' next token by one chunk, not by the
   whole prompt), else alone (`Runtime.decode_batch`: each weight read serves all of them).
Sequences join and leave between steps. Sampling, seeds and stop strings are per sequence, so a request's output
does not depend on what runs beside it: its greedy tokens are the ones it gets alone.

Results go back to the HTTP side as events on the request's asyncio queue (`Job.events`): `Delta` (text, and the
tokens with their logprobs when asked), then `Finish` (why, and the token counts) or `Failure`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from ..runtime.sampling import SamplingConfig, adjusted_row, next_token
from .metrics import Metrics
from .prefix_cache import PrefixCache
from .protocol import GenParams
from .tokens import TextStream, TokenText

log = logging.getLogger("codexmini.serve")


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


@dataclass
class TokenLogprob:
    id: int
    text: str
    bytes: bytes
    logprob: float
    top: list[tuple[str, float, bytes]] = field(default_factory=list)


@dataclass
class Delta:
    text: str
    tokens: list[TokenLogprob] = field(default_factory=list)  # filled only when logprobs were asked for


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failure:
    message: str


class Job:
    """One request as the engine sees it. The HTTP side reads `events`; `cancel()` stops it (a client that went
    away), from any thread."""

    def __init__(self, engine: Engine, prompt: list[int], params: GenParams, max_new: int,
                 loop: asyncio.AbstractEventLoop, arrival: float):
        self.engine, self.prompt, self.params, self.max_new = engine, prompt, params, max_new
        self.loop, self.arrival = loop, arrival
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False

    def emit(self, event) -> None:
        """Queue `event` for the HTTP side; the engine hands over what a step emitted at once (`Engine._flush`)."""
        if isinstance(event, (Finish, Failure)):
            self.done = True
        self.engine._outbox.append((self, event))

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            self.engine.wake()


def _deliver(items: list) -> None:
    """On the event loop: each event into its request's queue, in the order the engine emitted them."""
    for job, event in items:
        job.events.put_nowait(event)


class Sequence:
    """An admitted job: its session and what decoding it needs."""

    def __init__(self, job: Job, session, cached: int, logits, checkpoints: dict, tokenizer, token_text):
        self.job, self.session, self.cached = job, session, cached
        self.prompt = job.prompt
        self.logits = logits  # logits waiting to be sampled (the cache had the whole prompt)
        self.checkpoints = dict(checkpoints)
        self.prompt_logits: dict[int, torch.Tensor] = {}
        self.next_id: int | None = None  # the sampled token to feed in the next decode step
        self.generated = 0
        self.counts: Counter = Counter()
        p = job.params
        self.cfg = SamplingConfig(max_tokens=job.max_new, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                  repetition_penalty=p.repetition_penalty)
        self.gen = None
        if p.temperature > 0:
            self.gen = torch.Generator()
            if p.seed is not None:
                self.gen.manual_seed(p.seed)
            else:
                self.gen.seed()
        self.text = TextStream(tokenizer, p.stop)
        self.token_text = token_text
        self.first_token_at: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.next_id is None


class Worker:
    """The thread that runs engines: every model of a server on one. torch's intra-op threads are OpenMP's, which
    keeps a team of threads for each thread that runs parallel work; with one engine thread per model a 2-core
    machine held four such threads once two models had served a request, and libgomp, seeing more threads than
    cores, stopped spin-waiting between parallel regions: each region then paid a futex wake-up, and a one-sequence
    decode step of the other model took 2.3x as long (ITL 2.3 -> 5.4 ms). One thread also keeps two models' steps
    from competing for the same cores. Each pass gives every engine with work one step (its admissions, a prefill
    chunk, one decode step), in turn."""

    def __init__(self, name: str = "codexmini-engine"):
        self.cv = threading.Condition()
        self.engines: list[Engine] = []
        self.closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def add(self, engine: Engine) -> None:
        with self.cv:
            if engine not in self.engines:
                self.engines.append(engine)

    def start(self) -> None:
        if not self._thread.is_alive() and not self.closed:
            self._thread.start()

    def close(self) -> None:
        """Stop the thread after the step it is in; every request still waiting or running hears why."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self.closed and not any(e._busy() for e in self.engines):
                    self.cv.wait()
                if self.closed:
                    break
                work = [(e, e._take()) for e in self.engines if e._busy()]
            for engine, admit in work:
                engine._tick(admit)
        for engine in self.engines:
            engine._shutdown()


class Engine:
    """Runs requests on one model. `submit` from the event loop; everything else happens on its worker's thread
    (`worker`: shared by a server's models; by default the engine's own)."""

    def __init__(self, name: str, rt, *, parallel: int = 4, max_queue: int = 32, cache: PrefixCache | None = None,
                 metrics: Metrics | None = None, prefill_chunk: int = 256, worker: Worker | None = None):
        if parallel < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"parallel ({parallel}) and prefill_chunk ({prefill_chunk}) must be >= 1, max_queue "
                             f"({max_queue}) >= 0")
        self.name, self.rt, self.parallel, self.max_queue = name, rt, parallel, max_queue
        self.cache, self.metrics, self.prefill_chunk = cache, metrics or Metrics(), prefill_chunk
        self.token_text = TokenText(rt.tokenizer)
        self._waiting: deque[Job] = deque()
        self._outbox: list[tuple[Job, object]] = []  # events emitted on the engine thread, not yet handed over
        self._active: list[Sequence] = []
        self.worker = worker or Worker(f"codexmini-engine-{name}")
        self._cv = self.worker.cv

    # ----------------------------------------------------------------------- the HTTP side
    def start(self) -> None:
        self.worker.add(self)
        self.worker.start()

    def close(self) -> None:
        """Stop the worker (with every engine on it)."""
        self.worker.close()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def submit(self, prompt: list[int], params: GenParams, max_new: int, arrival: float | None = None) -> Job:
        """Queue a request (call from the event loop); raises `QueueFull` when no slot and no queue place is
        free."""
        job = Job(self, prompt, params, max_new, asyncio.get_running_loop(), arrival or time.monotonic())
        with self._cv:
            if self.worker.closed:
                raise QueueFull("the server is shutting down")
            free = self.parallel - len(self._active)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                self.metrics.inc("codexmini_requests_rejected_total", model=self.name)
                raise QueueFull(f"{len(self._active)} requests running and {len(self._waiting)} waiting")
            self._waiting.append(job)
            self._cv.notify()
        return job

    def load(self) -> tuple[int, int]:
        """(requests waiting, sequences active)."""
        return len(self._waiting), len(self._active)

    # ----------------------------------------------------------------------- the worker's thread
    def _busy(self) -> bool:
        return bool(self._waiting or self._active)

    def _take(self) -> list[Job]:
        """The waiting jobs that fit the free slots (under the worker's lock)."""
        admit = []
        while self._waiting and len(self._active) + len(admit) < self.parallel:
            admit.append(self._waiting.popleft())
        return admit

    def _tick(self, admit: list[Job]) -> None:
        """One step: admit `admit`, run the step, hand its events over."""
        try:
            for job in admit:
                self._admit(job)
            self._step()
        except Exception:  # noqa: BLE001 - the engine must outlive any one step; the clients hear about it
            log.exception("model %s: generation step failed", self.name)
            for seq in self._active:
                seq.job.emit(Failure("internal error while generating (see the server log)"))
            self._active.clear()
        self._flush()
        self._gauges()

    def _shutdown(self) -> None:
        for seq in self._active:
            seq.job.emit(Failure("the server is shutting down"))
        for job in self._waiting:
            job.emit(Failure("the server is shutting down"))
        self._flush()

    def _flush(self) -> None:
        """Hand the events emitted since the last flush to their event loops, one wake-up per loop: waking the
        loop once per token and sequence cost the engine thread ~5% of a step at 8 sequences."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
                pass

    def _gauges(self) -> None:
        m = self.metrics
        m.set("codexmini_queue_depth", len(self._waiting), model=self.name)
        m.set("codexmini_active_sequences", len(self._active), model=self.name)
        if self.cache is not None:
            m.set("codexmini_prefix_cache_bytes", self.cache.bytes, model=self.name)
            m.set("codexmini_prefix_cache_entries", len(self.cache), model=self.name)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self.metrics.inc("codexmini_requests_cancelled_total", model=self.name)
            job.emit(Finish("cancelled", len(job.prompt), 0, 0))
            return
        hit = self.cache.lookup(job.prompt) if self.cache is not None else None
        if self.cache is not None:
            self.metrics.inc("codexmini_prefix_cache_lookups_total", model=self.name)
        if hit is not None:
            self.metrics.inc("codexmini_prefix_cache_hits_total", model=self.name)
            self.metrics.inc("codexmini_prompt_tokens_cached_total", hit.cached, model=self.name)
            seq = Sequence(job, hit.session, hit.cached, hit.logits, hit.checkpoints, self.rt.tokenizer,
                           self.token_text)
        else:
            seq = Sequence(job, self.rt.new_session(), 0, None, {}, self.rt.tokenizer, self.token_text)
        self.metrics.inc("codexmini_prompt_tokens_total", len(job.prompt), model=self.name)
        self._active.append(seq)

    def _step(self) -> None:
        for seq in [s for s in self._active if s.job.cancelled]:
            self.metrics.inc("codexmini_requests_cancelled_total", model=self.name)
            self._finish(seq, "cancelled", flush=False)
        batch = [s for s in self._active if not s.prefilling]
        if any(s.prefilling for s in self._active):
            rode = self._prefill(batch)
            self._flush()  # first tokens go out now, not after this step's decode forward
            if rode:
                return
            batch = [s for s in self._active if not s.prefilling]
        if not batch:
            return
        self._decoded(batch, self.rt.decode_batch([s.next_id for s in batch], [s.session for s in batch]))

    def _decoded(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        """The decoding sequences `batch` have run their next token (logits `[B, V]`): sample the one after."""
        self.metrics.inc("codexmini_decode_steps_total", model=self.name)
        self.metrics.observe("codexmini_decode_batch_size", len(batch), model=self.name)
        for seq, row in zip(batch, logits):
            self._checkpoint(seq)
            self._sample(seq, row)
        self.metrics.generated(self.name, len(batch))

    def _checkpoint(self, seq: Sequence) -> None:
        pos = seq.session.pos
        if self.cache is not None and self.cache.wants_checkpoint(pos) and pos not in seq.checkpoints:
            seq.checkpoints[pos] = self.rt.checkpoint(seq.session)

    def _prefill(self, decoding: list[Sequence]) -> bool:
        """The next prompt chunks of the sequences still prefilling, oldest first, up to `prefill_chunk` tokens in
        all, in one forward (`Runtime.prefill_batch`: the int kernels dequantize each weight once for all of
        them); a sequence whose prompt is done samples its first token. The `decoding` sequences ride along, their
        next token a one-row chunk of the same forward: a prompt's matmuls are bound by compute, so a few more
        rows cost little beside a decoding step of their own, which would read every weight again. They do so only
        where every row of the forward is computed exactly as alone (`Runtime.exact_rows`: codexmini's int kernels
        up to their GEMVs' rows, any number with the AVX-512 panels), so greedy answers do not change. Returns
        whether they did."""
        budget, work = self.prefill_chunk, []
        for seq in self._active:
            if not seq.prefilling:
                continue
            start, end = seq.session.pos, len(seq.prompt)
            if start == end:  # the prefix cache held all of it
                work.append((seq, []))
            elif budget > 0:
                # chunks end at multiples of the chunk size, where the prefix cache keeps linear-state checkpoints
                stop = min(end, (start // self.prefill_chunk + 1) * self.prefill_chunk, start + budget)
                work.append((seq, seq.prompt[start:stop]))
                budget -= stop - start
        run = [(seq, chunk) for seq, chunk in work if chunk]
        if sum(len(chunk) for _, chunk in run) + len(decoding) > self.rt.exact_rows:
            decoding = []  # their rows would not be computed as alone: they take a decoding step of their own
        if run:
            logits = self.rt.prefill_batch([chunk for _, chunk in run] + [[seq.next_id] for seq in decoding],
                                           [seq.session for seq, _ in run] + [seq.session for seq in decoding])
            for (seq, _), row in zip(run, logits):
                seq.logits = row
            if decoding:
                self._decoded(decoding, logits[len(run):])
        for seq, chunk in work:
            end = len(seq.prompt)
            if seq.session.pos < end:
                self._checkpoint(seq)
                continue
            if chunk and self.cache is not None:
                seq.prompt_logits[end] = seq.logits
                if self.cache.recurrent and end not in seq.checkpoints:
                    seq.checkpoints[end] = self.rt.checkpoint(seq.session)
            logits, seq.logits = seq.logits, None
            if seq.job.max_new == 0:
                self._finish(seq, "length")
            else:
                self._sample(seq, logits)
        return bool(run and decoding)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        p = seq.job.params
        scores = logits
        if p.logit_bias or ((p.frequency_penalty or p.presence_penalty) and seq.counts):
            scores = adjusted_row(logits, p.logit_bias, seq.counts, p.frequency_penalty, p.presence_penalty)
        tok = next_token(scores, seq.cfg, seq.session.tokens, seq.gen)
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.observe("codexmini_time_to_first_token_seconds", now - seq.job.arrival, model=self.name)
        if not p.ignore_eos and tok in self.rt.eos_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.counts[tok] += 1
        text, stopped = seq.text.push(tok)
        infos = [self._logprob(logits, tok, p.logprobs)] if p.logprobs is not None else []
        if text or infos:
            seq.job.emit(Delta(text, infos))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif seq.generated >= seq.job.max_new:
            self._finish(seq, "length")
        else:
            seq.next_id = tok

    def _logprob(self, logits: torch.Tensor, tok: int, top: int) -> TokenLogprob:
        """The chosen token's log-probability under the model (before temperature, penalties and biases), with the
        `top` most likely alternatives."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        text, raw = self.token_text.lookup(tok)
        alts = []
        if top:
            vals, ids = lp.topk(top)
            for v, i in zip(vals.tolist(), ids.tolist()):
                t, b = self.token_text.lookup(i)
                alts.append((t, v, b))
        return TokenLogprob(tok, text, raw, float(lp[tok]), alts)

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        if flush:
            text, _ = seq.text.flush()
            if text:
                seq.job.emit(Delta(text))
        self._active.remove(seq)  # before the client hears: its slot is free when it does
        if self.cache is not None:
            self.cache.insert(seq.session, seq.checkpoints, seq.prompt_logits)
        seq.job.emit(Finish(reason, len(seq.prompt), seq.generated, seq.cached))
