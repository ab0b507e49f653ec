"""Load benchmark of `cli.py serve`: micro-batching against one request at a time, same run.

    python benchmarks/serve_load.py [--config configs/serve/default.yaml] [--requests 64]
        [--clients 16] [--max_tokens 128] [--subset 8] [--phase_seconds 150] [--threads 2]

Workload: the first ``--requests`` prompts of the labelled records (HumanEval and GSM-Symbolic
interleaved), greedy, ``max_tokens`` each, against the bundle the config names (build it first:
``python cli.py serve --build_bundle true``). Loopback only. Phases, one after the other so
only one process computes at a time:

1. plain generate, in process: the same cascade (``LiveCascade.run``, the backends' own
   ``generate`` with continuous batching) on ``--subset`` prompts at batch 1 and on
   2 × ``--subset`` prompts at batch 8: the batch-8 / batch-1 throughput gain G;
2. the server (a real `cli.py serve` process), one client sending ``--subset`` requests one
   after the other: one-request-at-a-time throughput;
3. the server, ``--clients`` concurrent clients over all ``--requests`` prompts: latency
   p50/p95/p99, requests/s, errors, and the micro-batching gain S over phase 2.

Goal (issue 4): S - 1 >= 0.7 (G - 1), i.e. micro-batching keeps at least 70% of plain
generate's batch-8 gain. Every phase stops issuing requests after ``--phase_seconds``
(requests in flight finish), so the run is bounded. At the end ``/stats`` and ``/metrics``
are compared with what the clients counted.

``--compare_admission`` runs instead, in one run, the two admissions of the server's engine
(``--admission batch``: a request waits until its stage's running batch ends, the earlier
behaviour; ``--admission join``: it joins the running batch at the next decoding step), each
with a fresh server and ``--clients`` streaming clients (``/v1/completions``, ``stream:
true``) over the same ``--requests`` prompts: time to first token (the first non-empty text
chunk) p50/p95, latency, requests/s and tokens/s. Goal (issue 17): TTFT p50 at least 2x lower
with join at equal or better throughput. ``--tiny`` builds and serves the tests' tiny random
2-stage bundle (``tests/serving/test_serve.py::build_tiny_bundle``) on the tests' short/long
prompts,
so the comparison runs without the zoo models (plumbing and scheduling, not model speed);
``--length_spread`` gives the requests different budgets (the tiny models never stop early).
``--baseline_max_batch`` gives the batch-admission phase its own ``max_batch``, so that one run
compares join admission at ``--max_batch`` with the earlier server at its earlier setting.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def workload(n: int, records: str = "data/cascade") -> list[str]:
    """n prompts, the two tasks interleaved, in a fixed order."""
    from toolkit.common.io import read_jsonl

    per_task = []
    for path in sorted(Path(REPO / records).glob("*/stage0-*.jsonl")):
        per_task.append([r["prompt"] for r in read_jsonl(path)])
    out = [p for group in zip(*per_task) for p in group]
    return out[:n]


def plain_generate(cfg: dict, prompts: list[str], subset: int, max_tokens: int,
                   threads: int) -> dict:
    import torch

    from toolkit.cascade.live import LiveCascade
    from toolkit.generation.base import DecodingConfig
    from toolkit.generation.hf_backend import TransformersBackend
    from toolkit.serving.bundle import load_bundle

    torch.set_num_threads(threads)
    bundle = load_bundle(REPO / cfg["bundle"])
    backends = [TransformersBackend(s["model"], dtype=cfg.get("dtype", "float32"))
                for s in bundle.stages]
    decoding = DecodingConfig(**{**bundle.meta["decoding"], "max_new_tokens": max_tokens})
    out = {}
    for batch, n in ((1, subset), (8, 2 * subset)):
        cascade = LiveCascade(backends, bundle.predictor, bundle.policy, decoding, batch)
        t0 = time.perf_counter()
        res = cascade.run(prompts[:n])
        wall = time.perf_counter() - t0
        tokens = sum(r.trace[-1].generated_tokens for r in res)
        out[f"batch{batch}"] = {"requests": n, "wall_s": wall, "req_per_s": n / wall,
                                "tok_per_s": tokens / wall,
                                "stops": np.bincount([r.stopped_at_stage for r in res],
                                                     minlength=len(backends)).tolist()}
        print(f"plain generate batch {batch}: {n} prompts in {wall:.1f} s "
              f"({n / wall:.3f} req/s)", flush=True)
    del backends
    gc.collect()
    out["gain"] = out["batch8"]["req_per_s"] / out["batch1"]["req_per_s"]
    return out


async def client_phase(url: str, prompts: list[str], clients: int, max_tokens: int,
                       seconds: float) -> dict:
    import httpx

    queue = list(enumerate(prompts))
    results: list[dict] = []
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() - t0 < seconds:
            i, prompt = queue.pop(0)
            start = time.perf_counter()
            try:
                r = await client.post(url + "/generate", json={
                    "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
                body = r.json() if r.status_code == 200 else None
                results.append({"i": i, "status": r.status_code,
                                "latency_s": time.perf_counter() - start,
                                "stage": body["stopped_at_stage"] if body else None,
                                "tokens": body["completion_tokens"] if body else 0})
            except httpx.HTTPError as err:
                results.append({"i": i, "status": f"{type(err).__name__}", "latency_s": 0,
                                "stage": None, "tokens": 0})

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(
            max_connections=clients + 4)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency_s"] for r in ok]) * 1000
    return {"clients": clients, "sent": len(results), "ok": len(ok),
            "errors": len(results) - len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency_ms": {f"p{q}": float(np.percentile(lat, q)) if len(lat) else None
                           for q in (50, 95, 99)},
            "stops": [sum(r["stage"] == k for r in ok) for k in range(2)]}


def start_server(config: str, threads: int, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(f"/tmp/serve_load_{port}.log")
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--config", config,
                             "--host", "127.0.0.1", "--port", str(port), "--threads",
                             str(threads), "--log_level", "warning", *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env={**os.environ, "LAMBDA_VALUE": ""})
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become healthy in 450 s")


def budgets(n: int, max_tokens: int, spread: bool) -> list[int]:
    """Each request's max_tokens: all ``max_tokens``, or with ``spread`` a fixed pseudo-random
    spread over [max_tokens / 8, max_tokens] (answer lengths vary in real use; the tiny
    random models never end an answer early, so ``--tiny --length_spread`` sets them)."""
    if not spread:
        return [max_tokens] * n
    return [max(1, round(max_tokens * (0.125 + 0.875 * ((i * 37) % 64) / 63)))
            for i in range(n)]


async def stream_phase(url: str, prompts: list[str], clients: int, max_tokens: list[int],
                       seconds: float) -> dict:
    """``clients`` streaming clients over the prompts (request i may ask for
    ``max_tokens[i]`` tokens): TTFT, latency, throughput."""
    import httpx

    queue = list(enumerate(prompts))
    results: list[dict] = []
    t0 = time.perf_counter()

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> dict:
        start, first, last = time.perf_counter(), None, None
        async with client.stream("POST", url + "/v1/completions", json={
                "prompt": prompt, "max_tokens": max_tokens[i], "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                return {"i": i, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"i": i, "status": f"stream error: {chunk['error']['message']}"}
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - start
                last = chunk
        done = time.perf_counter() - start
        return {"i": i, "status": 200, "ttft_s": done if first is None else first,
                "latency_s": done, "stage": last["cascade"]["stopped_at_stage"],
                "tokens": last["usage"]["completion_tokens"]}

    async def worker(client: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() - t0 < seconds:
            i, prompt = queue.pop(0)
            try:
                results.append(await one(client, i, prompt))
            except httpx.HTTPError as err:
                results.append({"i": i, "status": type(err).__name__})

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(
            max_connections=clients + 4)) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    failed = Counter(str(r["status"]) for r in results if r["status"] != 200)

    def pct(key: str) -> dict[str, float | None]:
        arr = np.array([r[key] for r in ok]) * 1000
        return {f"p{q}": float(np.percentile(arr, q)) if len(arr) else None for q in (50, 95)}

    return {"clients": clients, "sent": len(results), "ok": len(ok),
            "errors": len(results) - len(ok), "error_kinds": dict(failed), "wall_s": wall,
            "req_per_s": len(ok) / wall,
            "tok_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_ms": pct("ttft_s"),
            "latency_ms": pct("latency_s"),
            "stops": [sum(r["stage"] == k for r in ok) for k in range(2)]}


def compare_admission(config: str, prompts: list[str], args: argparse.Namespace) -> dict:
    """Both admissions, one fresh server each, the same streaming load (module docstring)."""
    import httpx

    out: dict = {}
    for mode in ("batch", "join"):
        max_batch = (args.baseline_max_batch or args.max_batch) if mode == "batch" \
            else args.max_batch
        extra = ("--max_batch", str(max_batch)) if max_batch else ()
        proc, url, _ = start_server(config, args.threads, "--admission", mode, *extra)
        try:
            httpx.post(url + "/generate", json={"prompt": prompts[0], "max_tokens": 4},
                       timeout=300)  # warm-up
            out[mode] = asyncio.run(stream_phase(
                url, prompts, args.clients,
                budgets(len(prompts), args.max_tokens, args.length_spread), args.phase_seconds))
            out[mode]["micro_batches"] = httpx.get(url + "/stats").json()["micro_batches"]
            out[mode]["max_batch"] = max_batch
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        r = out[mode]
        print(f"admission {mode} (max_batch {max_batch or 'of the config'}): {r['ok']} ok, "
              f"{r['errors']} errors, TTFT p50 "
              f"{r['ttft_ms']['p50']:.0f} ms p95 {r['ttft_ms']['p95']:.0f} ms, latency p50 "
              f"{r['latency_ms']['p50']:.0f} ms, {r['req_per_s']:.2f} req/s, "
              f"{r['tok_per_s']:.1f} tok/s, stops {r['stops']}", flush=True)
    b, j = out["batch"], out["join"]
    out["ttft_p50_ratio_batch_over_join"] = b["ttft_ms"]["p50"] / j["ttft_ms"]["p50"]
    out["throughput_ratio_join_over_batch"] = j["tok_per_s"] / b["tok_per_s"]
    out["goal_met"] = bool(out["ttft_p50_ratio_batch_over_join"] >= 2
                           and j["req_per_s"] >= b["req_per_s"] and b["errors"] == j["errors"]
                           == 0)
    return out


def tiny_setup(folder: Path, n: int) -> tuple[str, list[str]]:
    """The tests' tiny bundle and prompts (short ones stop at stage 0, long ones escalate)."""
    from tests.serving.test_serve import LONG, SHORT, build_tiny_bundle

    cfg, _ = build_tiny_bundle(folder, api_key=None, dtype="float32", max_batch=8,
                               limits={"max_tokens_limit": 256, "max_prompt_tokens": 256,
                                       "request_timeout_s": 900.0})
    mixed = [p for pair in zip(SHORT, LONG) for p in pair]
    return str(cfg), (mixed * (n // len(mixed) + 1))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/serve/default.yaml")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--subset", type=int, default=8)
    ap.add_argument("--phase_seconds", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare_admission", action="store_true",
                    help="measure TTFT and throughput of both admissions (see above)")
    ap.add_argument("--tiny", action="store_true",
                    help="with --compare_admission: the tests' tiny bundle, not --config")
    ap.add_argument("--length_spread", action="store_true",
                    help="with --compare_admission: spread max_tokens over [1/8, 1] of it")
    ap.add_argument("--max_batch", type=int, default=None,
                    help="with --compare_admission: the server's max_batch (default: the "
                         "config's); with max_batch < clients half the requests always queue")
    ap.add_argument("--baseline_max_batch", type=int, default=None,
                    help="with --compare_admission: max_batch of the batch-admission phase only "
                         "(default: --max_batch), to compare join at one max_batch against the "
                         "earlier server (batch admission) at another in one run")
    args = ap.parse_args()
    import httpx
    import yaml

    if args.compare_admission:
        run_comparison(args)
        return

    cfg = yaml.safe_load((REPO / args.config).read_text())
    prompts = workload(args.requests)
    t_start = time.perf_counter()
    plain = plain_generate(cfg, prompts, args.subset, args.max_tokens, args.threads)
    proc, url, log = start_server(args.config, args.threads)
    try:
        serial = asyncio.run(client_phase(url, prompts[:args.subset], 1, args.max_tokens,
                                          args.phase_seconds))
        print(f"server, 1 client: {serial['ok']} requests, {serial['req_per_s']:.3f} req/s",
              flush=True)
        before = httpx.get(url + "/stats").json()
        load = asyncio.run(client_phase(url, prompts, args.clients, args.max_tokens,
                                        args.phase_seconds))
        after = httpx.get(url + "/stats").json()
        metrics = httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    ok_delta = (after["requests"]["ok"] - before["requests"]["ok"])
    stops_delta = [a - b for a, b in zip(after["stops_per_stage"], before["stops_per_stage"])]
    prom_stops = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("toolkit_cascade_stops_total{")]
    agree = (ok_delta == load["ok"] and stops_delta == load["stops"][:len(stops_delta)]
             and prom_stops == [float(x) for x in after["stops_per_stage"]])
    gain_server = load["req_per_s"] / serial["req_per_s"]
    share = (gain_server - 1) / (plain["gain"] - 1) if plain["gain"] > 1 else float("nan")
    result = {"command": " ".join(sys.argv), "workload": {
                  "bundle": cfg["bundle"], "stages": cfg["stages"], "requests": len(prompts),
                  "max_tokens": args.max_tokens, "greedy": True, "subset": args.subset,
                  "threads": args.threads, "max_batch": cfg.get("max_batch")},
              "plain_generate": plain, "server_one_at_a_time": serial,
              "server_concurrent": load, "micro_batching_gain": gain_server,
              "plain_generate_gain": plain["gain"], "share_of_plain_gain": share,
              "goal_met": bool(share >= 0.7 and load["errors"] == 0),
              "stats_agree_with_clients": agree,
              "server_stats": {k: after[k] for k in ("requests", "stops_per_stage",
                                                     "latency_ms", "cost",
                                                     "micro_batches")},
              "total_wall_s": time.perf_counter() - t_start}
    from toolkit.common.paths import run_folder

    out = run_folder("bench", "serve_load")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lat = load["latency_ms"]
    print(f"\n{len(prompts)} requests, {args.clients} clients: {load['ok']} ok, "
          f"{load['errors']} errors, {load['req_per_s']:.3f} req/s, "
          f"{load['tok_per_s']:.1f} tok/s; latency p50 {lat['p50']:.0f} ms, "
          f"p95 {lat['p95']:.0f} ms, p99 {lat['p99']:.0f} ms; stops per stage {load['stops']}")
    print(f"one request at a time: {serial['req_per_s']:.3f} req/s -> micro-batching gain "
          f"{gain_server:.2f}x; plain generate batch 8 / batch 1: {plain['gain']:.2f}x; "
          f"share of plain gain (S-1)/(G-1) = {share:.2f} (goal >= 0.70: "
          f"{'met' if result['goal_met'] else 'NOT met'})")
    print(f"/stats and /metrics agree with the clients: {agree}; micro-batches "
          f"{after['micro_batches']}; total {result['total_wall_s']:.0f} s; written {out}")


def run_comparison(args: argparse.Namespace) -> None:
    import tempfile

    from toolkit.common.paths import run_folder

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            config, prompts = tiny_setup(Path(tmp), args.requests)
        else:
            config, prompts = args.config, workload(args.requests)
        result = compare_admission(config, prompts, args)
    result = {"command": " ".join(sys.argv), "workload": {
        "bundle": "tiny (tests/serving/test_serve.py)" if args.tiny else args.config,
        "requests": len(prompts), "clients": args.clients, "max_tokens": args.max_tokens,
        "length_spread": args.length_spread, "max_batch": args.max_batch,
        "baseline_max_batch": args.baseline_max_batch,
        "greedy": True, "threads": args.threads}, **result,
        "total_wall_s": time.perf_counter() - t_start}
    out = run_folder("bench", "serve_admission")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"TTFT p50 batch / join = {result['ttft_p50_ratio_batch_over_join']:.2f}x; "
          f"tokens/s join / batch = {result['throughput_ratio_join_over_batch']:.2f}x; "
          f"goal (>= 2x at equal or better throughput) "
          f"{'met' if result['goal_met'] else 'NOT met'}; written {out}")


if __name__ == "__main__":
    main()
