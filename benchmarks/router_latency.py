"""Router latency against the shipped `topk-v1` predictor call, side by side in one run.

    python benchmarks/router_latency.py [--calls 5000] [--embed_prompts 16]

Issue 15's goal: each predictor call as served (the router at entry; the post-draft predictor
per stage), batch 1, 1 thread, at most 1.5x today's `topk-v1` ONNX call; the embedding
forward's cost reported separately. What runs here is what the server runs per prompt:

* `topk-v1`: the shipped ``checkpoints/cascade/predictor/predictor.onnx`` on one feature row
  (onnxruntime, 1 thread) — the post-draft call, unchanged by routing;
* `heads: ...`: the one predictor module with router heads (``predictor_module``, the
  defaults of ``configs/cascade/fit.yaml``), trained here on every labelled prompt of
  ``data/cascade`` with the committed embedding sidecar and exported by the same exporter as
  ``fit`` (one ONNX file, the projection inside): the router call at entry (zero draft
  features, output ``router``), the post-draft call (output ``probabilities``) and both
  outputs; the embedding input is always fed. `draft-only (this exporter)` is the same
  exporter's file without router heads, for the share of the gap that the export itself
  closes (it folds the standardisation into the first layer);
* `router-<kind>`: the ``routing.py`` peers, ``Router.predict`` on one embedding, then
  ``routing.cell_labels`` (the entry decision's arithmetic), numpy arrays, not ONNX.
  Routers are fitted on every labelled prompt of ``data/cascade`` from the committed sidecar.

Batch-1 calls are timed one by one in alternating blocks (machine noise hits all alike); p50
and p99 in µs. With ``--embed_prompts N`` (and SmolLM2-135M pulled into the zoo) the embedding
forward (``PromptEmbedder.embed``, batch 1, 1 thread) is timed on N labelled prompts and
printed with its FLOPs from the sidecar: it is a model call, charged, not a predictor call.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _times(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def _heads_calls(table, emb, x_feat, x_emb):
    """(name, session, feeds, outputs) of the predictor-with-router-heads calls."""
    import tempfile

    from toolkit.cascade.onnx_export import export_onnx
    from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
    from toolkit.cascade.replay import fit_predictor

    tmp = Path(tempfile.mkdtemp(prefix="router_latency_"))
    every = np.ones(len(table.ids), bool)
    heads = OnnxQualityPredictor(export_onnx(fit_predictor(table, every, embeddings=emb),
                                             tmp / "heads.onnx"), threads=1)
    plain = OnnxQualityPredictor(export_onnx(fit_predictor(table, every), tmp / "plain.onnx"),
                                 threads=1)
    zeros = np.zeros_like(x_feat)
    return [("draft-only (this exporter)", plain.session, {"features": x_feat}, None),
            ("heads: router at entry", heads.session,
             {"features": zeros, "prompt_embedding": x_emb}, ["router"]),
            ("heads: post-draft", heads.session,
             {"features": x_feat, "prompt_embedding": x_emb}, ["probabilities"]),
            ("heads: both outputs", heads.session,
             {"features": x_feat, "prompt_embedding": x_emb}, None)]


def main() -> None:
    import torch

    from toolkit.cascade import routing
    from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
    from toolkit.cascade.prompt_embeddings import load_sidecar
    from toolkit.cascade.prompt_table import load_prompt_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default=str(REPO / "data" / "cascade"))
    ap.add_argument("--predictor", default=str(REPO / "checkpoints" / "cascade" / "predictor"
                                               / "predictor.onnx"))
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--embed_prompts", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)

    table = load_prompt_table(a.data_dir)
    emb, flops, meta = load_sidecar(a.data_dir, table.ids)
    onnx = OnnxQualityPredictor(a.predictor, threads=1)
    x_feat = table.features[:1, 0].astype(np.float32)  # one stage-0 feature row
    calls = {"topk-v1 (ONNX)": lambda: onnx.session.run(None, {onnx.input_name: x_feat})}
    x_emb = emb[:1]
    for name, session, feeds, outs in _heads_calls(table, emb, x_feat, x_emb):
        calls[name] = lambda s=session, f=feeds, o=outs: s.run(o, f)
    stages = list(range(table.num_stages))
    for kind in routing.ROUTERS:
        router = routing.fit_router(kind, emb, table.correct)
        edges = routing.cell_edges(router.predict(emb), stages, 2)

        def call(router=router, edges=edges):
            return routing.cell_labels(router.predict(x_emb), stages, edges)

        calls[f"router-{kind} (numpy)"] = call
    for fn in calls.values():  # warm-up
        for _ in range(300):
            fn()
    times = {name: [] for name in calls}
    for _ in range(10):  # alternating blocks
        for name, fn in calls.items():
            times[name] += _times(fn, a.calls // 10)

    base = float(np.median(times["topk-v1 (ONNX)"]))
    print(f"{len(table.ids)} prompts, embedding dim {emb.shape[1]} ({meta.get('slug')}), "
          f"{x_feat.shape[1]} topk-v1 features; batch 1, 1 thread, {a.calls} calls each")
    print(f"{'call':28} {'p50 µs':>8} {'p99 µs':>8} {'p50 / topk-v1':>14}")
    for name, t in times.items():
        t = np.sort(t)
        print(f"{name:28} {np.median(t):8.1f} {t[int(0.99 * len(t))]:8.1f} "
              f"{np.median(t) / base:13.2f}x")
    print("goal: each predictor call as served (router at entry, post-draft) <= 1.50x the "
          "topk-v1 call")

    if a.embed_prompts:
        from toolkit.cascade.prompt_embeddings import PromptEmbedder, labelled_prompts
        from toolkit.generation.base import DecodingConfig

        _, prompts, chat = labelled_prompts(a.data_dir)  # the sidecar's own prompts and format
        prompts = prompts[:a.embed_prompts]
        embedder = PromptEmbedder(f"zoo:{meta['slug']}", tuple(meta["layers"]),
                                  DecodingConfig(**chat))
        embedder.embed(prompts[:1])  # warm-up
        wall = [min(_times(lambda p=p: embedder.embed([p]), 1)) for p in prompts]
        print(f"embedding forward ({meta['slug']}, batch 1, {len(prompts)} prompts): p50 "
              f"{np.median(wall) / 1e3:.1f} ms; mean {flops.mean() / 1e9:.2f} GFLOPs a prompt "
              f"(charged to every routed request)")


if __name__ == "__main__":
    main()
