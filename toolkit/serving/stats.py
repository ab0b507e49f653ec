"""Running statistics of the server: one source for ``GET /stats`` and ``GET /metrics``.

Both endpoints render the same counters, so what a client counted, what ``/stats`` says and
what Prometheus scrapes agree by construction. Latency and time-to-first-token percentiles
come from the most recent ``window`` requests (a bounded deque, so memory stays flat).
"Cost saved" follows SPEC §D2: cost = 2 · N_non-embedding · tokens summed over the stages a
request ran; the always-top cost of a request that stopped early is estimated as the top
stage's parameters times the prompt and answer tokens of the answer returned.

A routing bundle's server also counts answers and cost by entry stage (``routing`` in
``/stats``; the cost includes the router's embedding forward, also shown apart); a server
without a router shows no such section.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np

QUANTILES = (0.5, 0.95, 0.99)


class ServerStats:
    """Thread-safe counters (the engine thread and the event loop both write)."""

    def __init__(self, num_stages: int, stage_names: list[str], window: int = 10_000,
                 routing: bool = False) -> None:
        self.num_stages, self.stage_names = num_stages, stage_names
        self.routing = routing
        # entry stage -> answers, FLOPs (embedding included), embedding FLOPs, stops per stage
        self.entries = [0] * num_stages
        self.entry_cost = [0.0] * num_stages
        self.entry_embed = [0.0] * num_stages
        self.entry_stops = [[0] * num_stages for _ in range(num_stages)]
        self.lock = threading.Lock()
        self.responses: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> n
        self.stops = [0] * num_stages
        self.latency_s: deque[float] = deque(maxlen=window)
        self.ttft_s: deque[float] = deque(maxlen=window)
        self.latency_sum, self.latency_count = 0.0, 0
        self.cost_flops, self.top_cost_flops = 0.0, 0.0
        self.generated_tokens = 0
        self.batches: Counter[int] = Counter()  # stage -> micro-batches run
        self.batched_requests: Counter[int] = Counter()  # stage -> requests in them
        self.joins: Counter[int] = Counter()  # stage -> requests that joined a running batch
        self.queue_depth = 0
        self.in_flight = 0
        self.abandoned = 0  # requests whose decoding stopped mid-answer: the client left

    # ------------------------------------------------------------------ writes
    def response(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.responses[(endpoint, status)] += 1

    def completed(self, stage: int, latency_s: float, cost: float, top_cost: float,
                  tokens: int, entry: int | None = None, embed_flops: float = 0.0) -> None:
        """One answer returned by ``stage``; ``entry`` is where a routed request entered
        (``cost`` includes its ``embed_flops``)."""
        with self.lock:
            if entry is not None:
                self.entries[entry] += 1
                self.entry_cost[entry] += cost
                self.entry_embed[entry] += embed_flops
                self.entry_stops[entry][stage] += 1
            self.stops[stage] += 1
            self.latency_s.append(latency_s)
            self.latency_sum += latency_s
            self.latency_count += 1
            self.cost_flops += cost
            self.top_cost_flops += top_cost
            self.generated_tokens += tokens

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft_s.append(seconds)

    def batch(self, stage: int, size: int) -> None:
        with self.lock:
            self.batches[stage] += 1
            self.batched_requests[stage] += size

    def joined(self, stage: int, size: int) -> None:
        """Requests that joined a running batch of the stage (join admission)."""
        with self.lock:
            self.batched_requests[stage] += size
            self.joins[stage] += size

    # ------------------------------------------------------------------- reads
    @staticmethod
    def _pct(values: deque[float]) -> dict[str, float | None]:
        if not values:
            return {f"p{int(q * 100)}": None for q in QUANTILES}
        arr = np.fromiter(values, dtype=np.float64)
        return {f"p{int(q * 100)}": float(np.quantile(arr, q) * 1000) for q in QUANTILES}

    def snapshot(self) -> dict[str, Any]:
        """The ``/stats`` body."""
        with self.lock:
            by_endpoint: dict[str, dict[str, int]] = {}
            for (ep, code), n in sorted(self.responses.items()):
                by_endpoint.setdefault(ep, {})[str(code)] = n
            ok = sum(n for (_, code), n in self.responses.items() if code == 200)
            saved = (1 - self.cost_flops / self.top_cost_flops) if self.top_cost_flops else None
            routing = {"routing": {"entry_stage": {str(k): {
                "answers": self.entries[k], "cost_flops": self.entry_cost[k],
                "embedding_flops": self.entry_embed[k],
                "mean_cost_flops": (self.entry_cost[k] / self.entries[k]
                                    if self.entries[k] else None),
                "stops_per_stage": list(self.entry_stops[k])}
                for k in range(self.num_stages)},
                "embedding_flops": sum(self.entry_embed)}} if self.routing else {}
            return {
                "requests": {"total": sum(self.responses.values()), "ok": ok,
                             "errors": sum(self.responses.values()) - ok,
                             "by_endpoint": by_endpoint,
                             "in_flight": self.in_flight, "queued": self.queue_depth,
                             "abandoned_mid_decode": self.abandoned},
                "stops_per_stage": list(self.stops),
                "stages": list(self.stage_names),
                "latency_ms": {**self._pct(self.latency_s),
                               "mean": (1000 * self.latency_sum / self.latency_count
                                        if self.latency_count else None),
                               "window": len(self.latency_s)},
                "time_to_first_token_ms": {**self._pct(self.ttft_s), "window": len(self.ttft_s)},
                "cost": {"flops": self.cost_flops, "always_top_flops_estimate":
                         self.top_cost_flops, "cost_saved": saved},
                "generated_tokens": self.generated_tokens,
                "micro_batches": {str(k): {"batches": self.batches[k],
                                           "mean_size": (self.batched_requests[k]
                                                         / self.batches[k]),
                                           "joined_running_batch": self.joins[k]}
                                  for k in sorted(self.batches)},
                **routing,
            }

    def prometheus(self) -> str:
        """The ``/metrics`` body (Prometheus text exposition format 0.0.4)."""
        s = self.snapshot()
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value:.10g}")

        with self.lock:
            resp = sorted(self.responses.items())
            lat = np.fromiter(self.latency_s, dtype=np.float64)
            ttft = np.fromiter(self.ttft_s, dtype=np.float64)
            lat_sum, lat_count = self.latency_sum, self.latency_count
        metric("toolkit_http_responses_total", "counter", "HTTP responses by endpoint and status",
               [(f'{{endpoint="{ep}",code="{code}"}}', n) for (ep, code), n in resp])
        metric("toolkit_cascade_stops_total", "counter", "Answers returned by each stage",
               [(f'{{stage="{k}",model="{m}"}}', n)
                for k, (m, n) in enumerate(zip(self.stage_names, s["stops_per_stage"]))])
        q = [(f'{{quantile="{qq}"}}', float(np.quantile(lat, qq))) for qq in QUANTILES
             ] if lat.size else []
        metric("toolkit_request_latency_seconds", "summary",
               "Latency of answered generation requests (window of recent requests)",
               [*q, ("_sum", lat_sum), ("_count", lat_count)])
        q = [(f'{{quantile="{qq}"}}', float(np.quantile(ttft, qq))) for qq in QUANTILES
             ] if ttft.size else []
        metric("toolkit_time_to_first_token_seconds", "summary",
               "Time to the first streamed token (window of recent streams)",
               [*q, ("_count", float(ttft.size))])
        metric("toolkit_cost_flops_total", "counter", "FLOPs spent over all stages run",
               [("", s["cost"]["flops"])])
        if self.routing:
            entry = s["routing"]["entry_stage"]
            metric("toolkit_cascade_entries_total", "counter",
                   "Answered requests by the stage the router sent them to first",
                   [(f'{{stage="{k}",model="{m}"}}', entry[str(k)]["answers"])
                    for k, m in enumerate(self.stage_names)])
            metric("toolkit_cascade_entry_cost_flops_total", "counter",
                   "FLOPs spent (embedding forward included) by entry stage",
                   [(f'{{stage="{k}",model="{m}"}}', entry[str(k)]["cost_flops"])
                    for k, m in enumerate(self.stage_names)])
            metric("toolkit_router_embedding_flops_total", "counter",
                   "FLOPs of the router's prompt-embedding forwards",
                   [("", s["routing"]["embedding_flops"])])
        metric("toolkit_always_top_cost_flops_total", "counter",
               "Estimated FLOPs had every request gone to the top stage",
               [("", s["cost"]["always_top_flops_estimate"])])
        metric("toolkit_generated_tokens_total", "counter", "Tokens of returned answers",
               [("", s["generated_tokens"])])
        metric("toolkit_in_flight_requests", "gauge", "Requests queued or running",
               [("", s["requests"]["in_flight"])])
        metric("toolkit_abandoned_requests_total", "counter",
               "Requests whose decoding was stopped mid-answer because the client left",
               [("", s["requests"]["abandoned_mid_decode"])])
        metric("toolkit_queued_requests", "gauge", "Requests waiting for a stage",
               [("", s["requests"]["queued"])])
        return "\n".join(lines) + "\n"
