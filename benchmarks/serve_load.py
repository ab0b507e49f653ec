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


def start_server(config: str, threads: int) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(f"/tmp/serve_load_{port}.log")
    proc = subprocess.Popen([sys.executable, "cli.py", "serve", "--config", config,
                             "--host", "127.0.0.1", "--port", str(port), "--threads",
                             str(threads), "--log_level", "warning"], cwd=REPO,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/serve/default.yaml")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_tokens", type=int, default=128)
    ap.add_argument("--subset", type=int, default=8)
    ap.add_argument("--phase_seconds", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import httpx
    import yaml

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


if __name__ == "__main__":
    main()
