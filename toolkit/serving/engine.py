"""Per-stage batching for the live cascade, on one engine thread, in one of two admissions.

Requests wait in one queue per stage. Every answer goes through the same generate → score →
decide step as offline runs and replay (``LiveCascade.run_stage`` / ``score``), so the server
makes the decisions the tests check against replay. Each request then stops (its answer is
returned) or joins the next stage's queue with its history.

``admission="join"`` (the default): each stage keeps a running batch (one per sampling
setting) in the decode loop, and a request waiting for that stage joins it at the next decoding
step, up to ``max_batch`` rows; an answer leaves the batch, is scored and handed back (or sent
on to the next stage) the step it finishes. The engine advances every running batch by one
step in turn, so no stage waits for another's batch to end.

``admission="batch"`` (the earlier behaviour): the thread picks the stage whose oldest
request has waited longest, lets more requests join for a short window (``wait_ms``, only if
that request has not already waited that long and the batch is not full), and runs that batch
to its end; requests arriving meanwhile wait for the next batch. Inside a batch the decode
loop still batches continuously: a finished answer leaves at once.

Why one thread for all stages: on a CPU the stages compete for the same cores, so running two
stage batches at once only interleaves them; one thread with all cores keeps each batch fast.
(A multi-GPU deployment would give each stage its own device and thread.)

Streaming: an answer is streamed only once it is certain to be returned. The top stage always
returns, so its tokens stream as they are decoded (``on_step`` hook of the decode loop); a
lower stage's answer is sent in one piece after the policy accepts it.

Routing bundles: a request is first embedded and routed (``LiveCascade.router``) on the
engine thread, in one batch with the others that arrived meanwhile (between decoding steps
under join admission), and queued at its entry stage with its router cell as policy group.

Results cross back to the asyncio loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import replace
from typing import Any

from toolkit.cascade.live import LiveCascade, StageStep
from toolkit.cascade.stopping import prompt_key
from toolkit.generation.base import GenerationOutput, GenerationRequest, call_cost
from toolkit.serving.jobs import (
    Job,
    JobResult,
    Session,
    generation_requests,
    resolve_future,
    sampling_key,
)
from toolkit.serving.outputs import cut_at_stop, streamable, token_logprobs
from toolkit.serving.stats import ServerStats

__all__ = ["CascadeEngine", "Job", "JobResult"]  # Job and JobResult live in jobs.py

log = logging.getLogger("toolkit.serving")


class CascadeEngine:
    """Queues, the engine thread and the hand-back of results (see the module docstring).

    Args:
        cascade: the live cascade (backends, ONNX predictor, stopping policy, decoding).
        stats: where completions, batches and queue depth are counted.
        max_batch: most requests in one stage batch (also the decode loop's active rows).
        wait_ms: how long the oldest request may wait for others to join its batch.
        max_queue: most requests in the system (queued + running); beyond it, 503.
        admission: ``join`` (requests join a running batch at the next step) or ``batch``
            (they wait for the running batch to end); see the module docstring.
    """

    def __init__(self, cascade: LiveCascade, stats: ServerStats, max_batch: int = 16,
                 wait_ms: float = 10.0, max_queue: int = 64, admission: str = "join") -> None:
        if admission not in ("join", "batch"):
            raise ValueError(f"admission must be 'join' or 'batch', got {admission!r}")
        if admission == "join" and not all(hasattr(b, "generate_steps")
                                           for b in cascade.backends):
            raise ValueError("admission 'join' needs backends that decode step by step "
                             "(generate_steps, the transformers backend); use 'batch'")
        self.admission = admission
        self.cascade, self.stats = cascade, stats
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_ms / 1000, max_queue
        self.cascade.batch_size = max_batch
        self.top = len(cascade.backends) - 1
        self.top_params = cascade.backends[-1].info.non_embedding_params
        self.queues: list[deque[Job]] = [deque() for _ in cascade.backends]
        self.arrivals: deque[Job] = deque()  # waiting to be routed (routing bundles)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="cascade-engine", daemon=True)
        self.thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, job: Job) -> bool:
        """Queue a job at its entry stage; False when the system is full (caller sends 503)."""
        with self.cond:
            if self.stopping or self.stats.in_flight >= self.max_queue:
                return False
            job.policy = self.cascade.policy.for_key(prompt_key(job.prompt))
            job.enqueued = time.perf_counter()
            if self.cascade.router is not None:
                self.arrivals.append(job)  # its entry stage is decided on the engine thread
            else:
                job.stage = job.policy.first_stage("")
                self.queues[job.stage].append(job)
            self.stats.in_flight += 1
            self.stats.queue_depth += 1
            self.cond.notify_all()
        return True

    def cancel(self, job: Job) -> None:
        """The client gave up (timeout/disconnect): drop the job when the engine next sees it."""
        with self.cond:
            job.cancelled = True

    # ----------------------------------------------------------------- thread
    def _loop(self) -> None:
        if self.admission == "join":
            self._loop_join()
            return
        while True:
            self._route_arrivals()
            picked = self._next_batch()
            if picked is None:
                return
            if not picked[1]:  # new arrivals to route first
                continue
            try:
                self._run(*picked)
            except Exception:  # never let one bad batch kill the engine thread
                log.exception("engine: batch failed")
                for job in picked[1]:
                    self._fail(job, "internal error while generating (see the server log)")

    def _drop_cancelled(self) -> None:
        """Forget queued jobs whose client went away (call with ``cond`` held)."""
        for q in self.queues:
            for job in [j for j in q if j.cancelled]:
                q.remove(job)
                self.stats.queue_depth -= 1
                self.stats.in_flight -= 1

    def _route_arrivals(self) -> None:
        """Embed and route up to ``max_batch`` arrived requests in one forward and queue each
        at its entry stage (routing bundles; nothing to do otherwise)."""
        router = self.cascade.router
        if router is None:
            return
        with self.cond:
            jobs = []
            while self.arrivals and len(jobs) < self.max_batch:
                job = self.arrivals.popleft()
                if job.cancelled:
                    self.stats.queue_depth -= 1
                    self.stats.in_flight -= 1
                else:
                    jobs.append(job)
        if not jobs:
            return
        try:
            routes = router.route([j.prompt for j in jobs], [j.policy for j in jobs])
        except Exception:  # never let one bad batch kill the engine thread
            log.exception("engine: routing failed")
            for job in jobs:
                with self.cond:
                    self.stats.queue_depth -= 1
                self._fail(job, "internal error while routing (see the server log)")
            return
        with self.cond:
            for job, route in zip(jobs, routes):
                job.route, job.group, job.stage = route, route.cell, route.entry_stage
                job.enqueued = time.perf_counter()
                self.queues[job.stage].append(job)
            self.cond.notify_all()

    def _next_batch(self) -> tuple[int, list[Job]] | None:
        with self.cond:
            while True:
                self._drop_cancelled()
                if self.arrivals:
                    return -1, []
                heads = [(q[0].arrived, k) for k, q in enumerate(self.queues) if q]
                if not heads:
                    if self.stopping:
                        return None
                    self.cond.wait()
                    continue
                k = min(heads)[1]
                q = self.queues[k]
                remaining = q[0].enqueued + self.wait_s - time.perf_counter()
                if len(q) < self.max_batch and remaining > 0 and not self.stopping:
                    self.cond.wait(remaining)
                    continue
                # One batch shares one sampling setting; others wait for the next batch.
                key = (q[0].temperature, q[0].top_p)
                batch, rest = [], []
                while q and len(batch) < self.max_batch:
                    job = q.popleft()
                    (batch if (job.temperature, job.top_p) == key else rest).append(job)
                q.extendleft(reversed(rest))
                self.stats.queue_depth -= len(batch)
                return k, batch

    def _run(self, k: int, batch: list[Job]) -> None:
        decoding = replace(self.cascade.decoding, temperature=batch[0].temperature,
                           top_p=batch[0].top_p)
        requests = generation_requests(batch)
        self.stats.batch(k, len(batch))
        steps = self.cascade.run_stage(k, requests, [j.history for j in batch], decoding,
                                       self._step_hook(k, batch),
                                       policies=[j.policy for j in batch],
                                       groups=[j.group for j in batch])
        for job, st in zip(batch, steps):
            if st.output.stop_reason == "cancelled":
                self._abandoned()
                continue
            self._route(k, job, st)

    def _abandoned(self) -> None:
        with self.cond:
            self.stats.in_flight -= 1
            self.stats.abandoned += 1

    def _route(self, k: int, job: Job, st: StageStep) -> None:
        """After stage k decided: hand the answer back, or queue the job for the next stage."""
        job.history = st.history
        job.traces.append(st.trace)
        if st.decision.action == "stop":
            self._finish(job, k, st)
            return
        with self.cond:
            if job.cancelled:
                self.stats.in_flight -= 1
                return
            job.stage, job.enqueued = st.decision.next_stage, time.perf_counter()
            self.queues[job.stage].append(job)
            self.stats.queue_depth += 1
            self.cond.notify_all()

    # ------------------------------------------------------ join admission
    def _loop_join(self) -> None:
        sessions: list[Session] = []
        while True:
            self._route_arrivals()
            with self.cond:
                self._drop_cancelled()
                for k, q in enumerate(self.queues):
                    if q and not any(s.stage == k and s.key == sampling_key(q[0])
                                     for s in sessions):
                        sessions.append(self._open(k, sampling_key(q[0])))
                if not sessions:
                    if self.arrivals:
                        continue
                    if self.stopping and not any(self.queues):
                        return
                    self.cond.wait()
                    continue
            for sess in list(sessions):
                try:
                    finished = next(sess.steps)
                    if finished:
                        self._settle(sess, finished)
                except StopIteration:
                    sessions.remove(sess)
                except Exception:  # never let one bad batch kill the engine thread
                    log.exception("engine: batch failed")
                    sessions.remove(sess)
                    for i, job in enumerate(sess.jobs):
                        if i not in sess.settled:
                            self._fail(job, "internal error while generating (see the "
                                       "server log)")

    def _open(self, k: int, key: tuple[float, float]) -> Session:
        """Start stage k's running batch for one sampling setting (call with ``cond`` held)."""
        sess = Session(k, key, [], set(), iter(()))
        first = self._take(sess, self.max_batch)
        decoding = replace(self.cascade.decoding, temperature=key[0], top_p=key[1])
        sess.steps = self.cascade.backends[k].generate_steps(
            generation_requests(first), decoding, batch_size=self.max_batch,
            on_step=self._step_hook(k, sess.jobs), admit=lambda free: self._admit(sess, free))
        self.stats.batch(k, len(first))
        return sess

    def _take(self, sess: Session, free: int) -> list[Job]:
        """Move up to ``free`` jobs of the session's setting from the head of its stage's
        queue into the session (first come, first served: a job with another setting at the
        head stops the intake until its own batch takes it). Call with ``cond`` held."""
        q, taken = self.queues[sess.stage], []
        while q and len(taken) < free and sampling_key(q[0]) == sess.key:
            taken.append(q.popleft())
        self.stats.queue_depth -= len(taken)
        sess.jobs.extend(taken)
        return taken

    def _admit(self, sess: Session, free: int) -> list[GenerationRequest]:
        """The decode loop asks for more work before each step: the queue's new arrivals."""
        with self.cond:
            self._drop_cancelled()
            taken = self._take(sess, free)
        if taken:
            self.stats.joined(sess.stage, len(taken))
        return generation_requests(taken)

    def _settle(self, sess: Session, finished: list[tuple[int, GenerationOutput]]) -> None:
        """Score the answers that finished this step and route each job on."""
        live = []
        for i, out in finished:
            if out.stop_reason == "cancelled":
                sess.settled.add(i)
                self._abandoned()
            else:
                live.append((i, out))
        if not live:
            return
        jobs = [sess.jobs[i] for i, _ in live]
        steps = self.cascade.score(sess.stage, [o for _, o in live], [j.history for j in jobs],
                                   [j.policy for j in jobs], [j.group for j in jobs],
                                   [j.route.embedding if j.route else None for j in jobs])
        for (i, _), job, st in zip(live, jobs, steps):
            sess.settled.add(i)  # before routing: a failure after this is not this job's
            self._route(sess.stage, job, st)

    def _step_hook(self, k: int, batch: list[Job]) -> Any:
        """The decode loop's per-step hook: abandon the rows of cancelled jobs (their client
        timed out or went away, so their tokens would be decoded for nobody) and, on the top
        stage, send each streaming job its new text."""
        tokenizer = self.cascade.backends[k].tokenizer
        streaming = k == self.top
        ids: dict[int, list[int]] = defaultdict(list)  # the batch may grow (join admission)

        def on_step(rows: list[int], tokens: list[int]) -> list[int]:
            abandon = []
            for i, tok in zip(rows, tokens):
                job = batch[i]
                if job.cancelled:
                    abandon.append(i)
                    continue
                if not streaming or job.events is None:
                    continue
                ids[i].append(tok)
                text = tokenizer.decode(ids[i], skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue  # an incomplete UTF-8 character: wait for the next token
                text = streamable(text, job.stop)
                if text.startswith(job.sent_text):
                    self._send_delta(job, text[len(job.sent_text):])
            return abandon

        return on_step

    # ------------------------------------------------------------ hand-back
    def _send_delta(self, job: Job, delta: str) -> None:
        if not delta:
            return
        job.sent_text += delta
        if job.first_token_s is None:
            job.first_token_s = time.perf_counter() - job.arrived
            self.stats.first_token(job.first_token_s)
        job.loop.call_soon_threadsafe(job.events.put_nowait, ("delta", delta))

    def _finish(self, job: Job, k: int, st: StageStep) -> None:
        with self.cond:
            self.stats.in_flight -= 1
            if job.cancelled:
                return
        out = st.output
        latency = time.perf_counter() - job.arrived
        embed = job.route.embedding_flops if job.route is not None else 0.0
        cost = sum(t.cost_flops for t in job.traces) + embed
        top_cost = st.trace.cost_flops if k == self.top else call_cost(
            self.top_params, out.prompt_tokens, out.generated_tokens)
        text, stopped = cut_at_stop(st.trace.output, job.stop)
        logprobs = None
        if job.top_logprobs is not None:
            tokenizer = self.cascade.backends[k].tokenizer
            logprobs = token_logprobs(
                out.token_ids, out.token_logprobs, out.top_ids, out.top_logprobs,
                job.top_logprobs, len(text),
                lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        result = JobResult(
            text=text, stopped_at_stage=k, logprobs=logprobs,
            stage_probabilities=[t.p for t in job.traces], latency_ms=1000 * latency,
            cost_flops=cost, prompt_tokens=out.prompt_tokens,
            completion_tokens=out.generated_tokens,
            finish_reason="length" if out.stop_reason == "length" and not stopped else "stop",
            trace=[{"stage": t.stage, "model": t.model, "p": t.p, "decision": t.decision,
                    "why": t.why, "generated_tokens": t.generated_tokens,
                    "wall_s": t.wall_s} for t in job.traces],
            route=None if job.route is None else job.route.to_dict())
        self.stats.completed(k, latency, cost, top_cost, out.generated_tokens,
                             None if job.route is None else job.route.entry_stage, embed)
        if job.events is not None:
            if result.text.startswith(job.sent_text):
                self._send_delta(job, result.text[len(job.sent_text):])
            job.loop.call_soon_threadsafe(job.events.put_nowait, ("end", result))
        job.loop.call_soon_threadsafe(resolve_future, job.done, result, None)

    def _fail(self, job: Job, message: str) -> None:
        with self.cond:
            self.stats.in_flight -= 1
        if job.events is not None:
            job.loop.call_soon_threadsafe(job.events.put_nowait, ("error", message))
        job.loop.call_soon_threadsafe(resolve_future, job.done, None, RuntimeError(message))
