"""All diffusion decoding policies on the same held-out problems, side by side in one run.

    python benchmarks/dllm_policies.py [--ckpt checkpoints/dllm/small/model.ckpt] [--n 50]

For each family the toolkit's small diffusion LM was trained on (short answers), the same
held-out problems are decoded by every policy, one after the other, batch 1, greedy:
``llada`` (reference, steps = gen_length, block 32: Fast-dLLM's baseline), ``fastdllm``
(block 32, τ 0.9, prefix cache), ``adaptive`` (the seed's defaults = its code preset, B 16,
τ 0.8), its ablations (no block sizing, no threshold adaptation, no cache at all, Fast-dLLM's
prefix cache instead of the tiered one), the seed's presets math (B 8, τ 0.9) and creative
(B 32, τ 0.7), a static control for the latter (fastdllm at τ 0.7), block-size controls
(fastdllm at block 16, the code preset's; adaptive starting at block 32) and the peers eb and
wino at their default knobs. Reports accuracy,
mean NFE (with the lower bound ceil(L_eff/B) beside it), wall time and answer tokens per
second (after one untimed warm-up problem per policy), and the ratios the issue asks for:
NFE fastdllm / adaptive (goal ≥ 1.3 at equal or better accuracy) and wall llada / fastdllm
and llada / adaptive (goal ≥ 5, at the same gen length).

    python benchmarks/dllm_policies.py --sweep [--n 50]

The curve instead of one point: each policy's knob is swept (τ for fastdllm, the entropy bound
γ for eb, presets and the starting τ for adaptive, the draft/verify thresholds for wino) on
the same held-out problems, at batch 1 and batch 8, with llada (steps = gen_length) as the
reference. Reports accuracy against tokens per forward (TPF = Σ answer tokens / Σ NFE), each
policy's accuracy under parallelism (AUP, ``toolkit/dllm/curve.py``), the Pareto front over all
points, and wall time against llada at each batch size; writes ``sweep.json`` and
``accuracy_vs_tpf.png`` to ``runs/bench/dllm_policies/<UTC stamp>/``.

    python benchmarks/dllm_policies.py --devices 2 [--accelerator cpu] ...

Over several devices: Lightning Fabric launches one process per device (strategy ddp); each
decodes its share of every family's decode batches (whole batches, round robin:
``toolkit/dllm/shards.py``, as the fit-time decode callback does) and the rows are gathered
and sorted by id on every rank, so accuracy, NFE and TPF equal one process's. Rank 0 prints
and writes. Wall times are then summed over the ranks' rows: device-seconds of decoding,
comparable between policies of one run, not elapsed time.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from toolkit.common.paths import run_folder
from toolkit.dllm.curve import (
    accuracy_under_parallelism,
    nfe_to_reach,
    paired_interval,
    pareto_front,
)
from toolkit.dllm.eval_module import decode_problems
from toolkit.dllm.registry import make_policy
from toolkit.dllm.shards import gather_sorted, rank_batches
from toolkit.dllm.tasks_data import get_family, make_problems
from toolkit.dllm.train_module import load_diffusion_checkpoint_with_meta

POLICIES = {
    "llada": ("llada", {"block_length": 32}),
    "fastdllm": ("fastdllm", {"block_length": 32, "threshold": 0.9, "cache": "prefix"}),
    "adaptive": ("adaptive", {}),
    "adaptive-no-block": ("adaptive", {"dynamic_block": False}),
    "adaptive-no-threshold": ("adaptive", {"adaptive_threshold": False}),
    # As `cli.py test --method dllm-adaptive-no-cache`: every step a full forward.
    "adaptive-no-cache": ("adaptive", {"tiered_cache": False, "cache": "none"}),
    # The tiered cache replaced by Fast-dLLM's prefix cache (refreshed once per block).
    "adaptive-prefix-cache": ("adaptive", {"tiered_cache": False, "cache": "prefix"}),
    "adaptive-math": ("adaptive", {"preset": "math"}),
    "adaptive-creative": ("adaptive", {"preset": "creative"}),
    # Control for the creative preset, which starts at τ 0.7: is its gain the adaptation, or
    # only the lower threshold? A static Fast-dLLM at the same τ answers that.
    "fastdllm-tau0.7": ("fastdllm", {"block_length": 32, "threshold": 0.7, "cache": "prefix"}),
    # Controls for the code preset's starting block of 16 (Fast-dLLM's is 32): is a loss of
    # accuracy the block size or the adaptation? Static Fast-dLLM at block 16, and adaptive
    # starting at block 32.
    "fastdllm-block16": ("fastdllm", {"block_length": 16, "threshold": 0.9, "cache": "prefix"}),
    "adaptive-block32": ("adaptive", {"base_block_size": 32}),
    # Training-free peers (toolkit/dllm/peer_policies.py) at their default knobs.
    "eb": ("eb", {"block_length": 32, "gamma": 0.1, "cache": "prefix"}),
    "wino": ("wino", {"block_length": 32, "draft_threshold": 0.6, "verify_threshold": 0.9}),
}


SWEEP: dict[str, list[tuple[str, dict]]] = {
    "fastdllm": [(f"tau {t}", {"threshold": t, "cache": "prefix"})
                 for t in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)],
    "eb": [(f"gamma {g}", {"gamma": g, "cache": "prefix"}) for g in (0.01, 0.03, 0.1, 0.3, 1, 3)],
    "adaptive": [(f"preset {p}", {"preset": p}) for p in ("math", "code", "creative")]
    + [(f"tau {t}", {"base_threshold": t, "min_threshold": min(0.7, t),
                     "max_threshold": max(0.95, t)}) for t in (0.6, 0.9, 0.97)],
    "wino": [(f"draft {d} verify {v}", {"draft_threshold": d, "verify_threshold": v})
             for d, v in ((0.3, 0.7), (0.5, 0.8), (0.6, 0.9), (0.7, 0.95), (0.8, 0.99))],
}
# The paper's description alone, without the released code's progress guard (peer_policies.py).
SWEEP["wino-no-guard"] = [(label, {**kw, "progress_guard": False}) for label, kw in SWEEP["wino"]]
SWEEP_KIND = {"wino-no-guard": "wino"}


def _policy(kind: str, kw: dict, gen: int):
    args = dict(kw)
    if kind == "llada":
        args["steps"] = gen  # one token per step, as Fast-dLLM's baseline
    if kind in ("llada", "fastdllm", "eb", "wino"):
        args["block_length"] = min(args.get("block_length", 32), gen)
    return make_policy(kind, **args)


def _decode_shard(model, tok, probs: list, policy, gen: int, batch: int,
                  shard: tuple[int, int]) -> list[dict]:
    """This rank's whole batches of ``probs`` (one family), decoded; every rank's rows sorted
    by id (a collective when ``shard`` = (rank, world) has world > 1). A row's ``wall_s`` is
    its decode call's wall time shared equally by the call's rows, so a sum over rows is the
    decode time of every batch."""
    with torch.inference_mode():
        rows = [r for b in rank_batches(probs, batch, *shard)
                for r in decode_problems(model, tok, b, policy, gen, batch_size=len(b))]
    return gather_sorted(rows)


def _run_point(model, tok, problems: dict, kind: str, kw: dict, batch: int,
               shard: tuple[int, int] = (0, 1), metric: str = "exact") -> dict:
    """Decode every family's problems with one policy setting; pooled statistics.
    ``metric``: ``exact`` (final answer right) or ``steps`` (fraction of a multi-block
    answer's intermediate steps right, for a model that gets few answers exactly right)."""
    rows = []
    for gen, probs in problems.values():
        policy = _policy(kind, kw, gen)
        with torch.inference_mode():
            decode_problems(model, tok, probs[:batch], policy, gen, batch_size=batch)  # warm-up
        rows += _decode_shard(model, tok, probs, policy, gen, batch, shard)
    if metric == "steps":
        for r in rows:
            if "step_accuracy" not in r:
                raise SystemExit(f"--metric steps: family {r['family']} writes no steps")
            r["correct"] = r["step_accuracy"]
    return {"accuracy": 100.0 * float(np.mean([r["correct"] for r in rows])),
            "tpf": float(np.sum([r["answer_tokens"] for r in rows]))
            / float(np.sum([r["nfe"] for r in rows])),
            "nfe": float(np.mean([r["nfe"] for r in rows])),
            "stalled": float(np.mean([r["stalled"] for r in rows])),
            "wall_s": float(np.sum([r["wall_s"] for r in rows])),
            "correct": [r["correct"] for r in rows], "nfe_rows": [r["nfe"] for r in rows]}


def sweep(a: argparse.Namespace, model, tok, meta: dict) -> None:
    problems = {}
    for fam in a.families:
        gen = get_family(fam).gen_length
        problems[fam] = (gen, make_problems(fam, "test", a.n, seed=meta.get("data_seed", 0),
                                            tokenizer=tok, gen_length=gen))
    grid = [("llada", "steps = gen_length", "llada", {})]
    grid += [(name, label, SWEEP_KIND.get(name, name), kw) for name, pts in SWEEP.items()
             for label, kw in pts]
    if a.policies:
        grid = [g for g in grid if g[0] in a.policies or g[0] == "llada"]  # llada: the x ref
    points = []
    for name, label, kind, kw in grid:
        point = {"policy": name, "knob": label, "args": kw}
        for batch in a.batches:
            res = _run_point(model, tok, problems, kind, kw, batch, a.shard, a.metric)
            point[f"b{batch}"] = res
        first = point[f"b{a.batches[0]}"]
        # Greedy decoding of a row does not depend on its batch (tests/dllm/test_dllm_decoding.py):
        # accuracy and NFE are the same at every batch size; only the wall time differs.
        point["batch_mismatches"] = sum(
            sum(x != y for x, y in zip(first["correct"], point[f"b{b}"]["correct"]))
            for b in a.batches[1:])
        points.append(point)
        if a.shard[0]:
            continue  # rank 0 prints and reports
        print(f"{name:9} {label:22} acc {first['accuracy']:5.1f}%  TPF {first['tpf']:5.2f}  "
              + "  ".join(f"wall b{b} {point[f'b{b}']['wall_s']:6.1f}s" for b in a.batches),
              flush=True)
    if a.shard[0] == 0:
        report(a, points)


def report(a: argparse.Namespace, points: list[dict]) -> None:
    b0 = f"b{a.batches[0]}"
    xy = [(p[b0]["tpf"], p[b0]["accuracy"]) for p in points]
    front = set(pareto_front(xy))
    y_max = max(y for _, y in xy)
    ref = points[0]
    aup = {name: accuracy_under_parallelism([xy[i] for i, p in enumerate(points)
                                             if p["policy"] == name], y_max)
           for name in dict.fromkeys(p["policy"] for p in points)}
    n = len(a.families) * a.n
    print(f"\n{n} held-out problems ({a.n} per family), greedy, threads "
          f"{torch.get_num_threads()}; TPF = answer tokens / NFE; * = Pareto front")
    print("accuracy = " + ("fraction of intermediate steps right (--metric steps)"
                           if a.metric == "steps" else "exact final answers"))
    print(f"{'policy':9} {'knob':22} {'acc %':>6} {'TPF':>6} {'NFE':>6} {'stall':>5} "
          + " ".join(f"{'wall b' + str(b):>9} {'x llada':>7}" for b in a.batches))
    for i, p in enumerate(points):
        s = p[b0]
        print(f"{p['policy']:9} {p['knob']:22} {s['accuracy']:6.1f} {s['tpf']:6.2f} "
              f"{s['nfe']:6.2f} {s['stalled']:5.2f} "
              + " ".join(f"{p[f'b{b}']['wall_s']:9.1f} "
                         f"{ref[f'b{b}']['wall_s'] / p[f'b{b}']['wall_s']:7.1f}"
                         for b in a.batches) + (" *" if i in front else ""))
    print("AUP (accuracy under parallelism, y in %, alpha 3, y_max "
          f"{y_max:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in aup.items()))
    print("rows whose correctness differs between batch sizes: "
          f"{sum(p['batch_mismatches'] for p in points)}")
    goal_lines = goals(points, a.batches)
    print("\n".join(goal_lines))
    out = run_folder("bench", "dllm_policies")
    out.mkdir(parents=True, exist_ok=True)
    for p in points:
        for b in a.batches:
            p[f"b{b}"].pop("correct")
            p[f"b{b}"].pop("nfe_rows")
    (out / "sweep.json").write_text(json.dumps(
        {"ckpt": a.ckpt, "n_per_family": a.n, "families": a.families, "batches": a.batches,
         "threads": torch.get_num_threads(), "points": points, "aup": aup, "y_max": y_max,
         "pareto_front": [points[i]["policy"] + " " + points[i]["knob"] for i in sorted(front)],
         "goals": goal_lines},
        indent=1))
    _plot(points, xy, front, aup, out / "accuracy_vs_tpf.png")
    print(f"results: {out / 'sweep.json'}")


def goals(points: list[dict], batches: list[int], peers=("fastdllm", "eb", "wino"),
          ratio_goal: float = 1.3, wall_goal: float = 5.0) -> list[str]:
    """The issue's goals read off one sweep (first batch size for accuracy and NFE, which do
    not depend on the batch; every batch size for wall time):

    * for each of adaptive's Pareto-optimal points, the NFE each peer's curve needs for the
      same accuracy (:func:`nfe_to_reach`) over adaptive's NFE; the goal counts the accuracy
      levels where fastdllm's ratio is ≥ ``ratio_goal``;
    * every peer point that beats one of those adaptive points on both accuracy and NFE
      beyond the paired 95% bootstrap intervals (over the same problems);
    * per batch size, the best wall-time ratio llada / adaptive among adaptive points at
      llada's accuracy or better."""
    b0 = f"b{batches[0]}"
    by = {name: [p for p in points if p["policy"] == name]
          for name in dict.fromkeys(p["policy"] for p in points)}
    if "adaptive" not in by:
        return ["goals: no adaptive points in this sweep"]
    ad = by["adaptive"]
    front = [ad[i] for i in pareto_front([(p[b0]["tpf"], p[b0]["accuracy"]) for p in ad])]
    lines = [f"\ngoals (adaptive's Pareto points; NFE = mean forwards a problem, paired 95% "
             f"bootstrap over {len(ad[0][b0]['correct'])} problems):"]
    for peer in (q for q in peers if q in by):
        curve = [(p[b0]["nfe"], p[b0]["accuracy"]) for p in by[peer]]
        hits, beaten = 0, []
        for p in front:
            need = nfe_to_reach(curve, p[b0]["accuracy"])
            ratio = None if need is None else need / p[b0]["nfe"]
            hits += ratio is None or ratio >= ratio_goal
            lines.append(f"  vs {peer:9} adaptive {p['knob']:18} acc {p[b0]['accuracy']:5.1f}% "
                         f"NFE {p[b0]['nfe']:6.2f}: {peer} needs "
                         + ("(never reaches it)" if need is None
                            else f"{need:6.2f} NFE = {ratio:.2f}x"))
            for q in by[peer]:
                acc = paired_interval(q[b0]["correct"], p[b0]["correct"])
                nfe = paired_interval(p[b0]["nfe_rows"], q[b0]["nfe_rows"])
                if acc[1] > 0 and nfe[1] > 0:
                    beaten.append(f"{q['knob']} beats {p['knob']} (accuracy +{100 * acc[0]:.1f}"
                                  f" [{100 * acc[1]:.1f}, {100 * acc[2]:.1f}] points, NFE "
                                  f"-{nfe[0]:.2f} [{nfe[1]:.2f}, {nfe[2]:.2f}])")
        lines.append(f"  vs {peer}: {hits} of {len(front)} accuracy levels at >= {ratio_goal}x "
                     f"fewer NFE (or unreached by {peer}); points of {peer} beating adaptive "
                     f"beyond the intervals: {'; '.join(beaten) if beaten else 'none'}")
    ref = by.get("llada", [None])[0]
    if ref is not None:
        for b in batches:
            ok = [ref[f"b{b}"]["wall_s"] / p[f"b{b}"]["wall_s"] for p in ad
                  if p[b0]["accuracy"] >= ref[b0]["accuracy"]]
            lines.append(f"  wall llada / adaptive at batch {b}, at llada's accuracy "
                         f"({ref[b0]['accuracy']:.1f}%) or better: "
                         + (f"best {max(ok):.1f}x (goal >= {wall_goal}x)" if ok
                            else "no adaptive point reaches it"))
    return lines


def _plot(points: list[dict], xy: list[tuple[float, float]], front: set[int],
          aup: dict[str, float], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in aup:
        pts = sorted(xy[i] for i, p in enumerate(points) if p["policy"] == name)
        ax.plot(*zip(*pts), marker="o", label=f"{name} (AUP {aup[name]:.0f})")
    fx = sorted(xy[i] for i in front)
    ax.plot(*zip(*fx), color="black", lw=0.8, ls="--", label="Pareto front")
    ax.set_xlabel("tokens per forward (answer tokens / NFE)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(rs: list[dict]) -> dict[str, float]:
    s = {k: float(np.mean([r[k] for r in rs])) for k in ("correct", "nfe", "lower_bound")}
    s["wall"] = float(np.sum([r["wall_s"] for r in rs]))
    s["tok_s"] = float(np.sum([r["answer_tokens"] for r in rs])) / max(s["wall"], 1e-12)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="checkpoints/dllm/small/model.ckpt")
    ap.add_argument("--n", type=int, default=50, help="held-out problems per family (the "
                    "first n of the test split, as `cli.py test --method dllm-*` decodes)")
    ap.add_argument("--families", nargs="*",
                    default=["spell_backward", "word_sorting", "number_sorting", "chain_sum"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (timings)")
    ap.add_argument("--json", default=None, help="also write the summaries to this file")
    ap.add_argument("--sweep", action="store_true", help="sweep each policy's knob instead")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8],
                    help="batch sizes of the sweep")
    ap.add_argument("--devices", type=int, default=1, help="processes (Lightning Fabric, "
                    "strategy ddp) that share the problems; rows gathered on every rank")
    ap.add_argument("--accelerator", default="cpu", help="Fabric accelerator with --devices")
    ap.add_argument("--metric", choices=("exact", "steps"), default="exact",
                    help="sweep quality: exact final answers, or the fraction of intermediate "
                         "steps right (multi-block families)")
    ap.add_argument("--policies", nargs="*", default=None,
                    help=f"sweep only these besides llada (of {', '.join(SWEEP)}); default: all")
    a = ap.parse_args()
    model, tok, meta = load_diffusion_checkpoint_with_meta(a.ckpt)
    a.shard = (0, 1)
    if a.devices > 1:
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator=a.accelerator, devices=a.devices, strategy="ddp")
        fabric.launch()  # re-runs this script once per further device
        a.shard = (fabric.global_rank, fabric.world_size)
        model = model.to(fabric.device)
    torch.set_num_threads(a.threads)
    model.eval()
    if a.sweep:
        sweep(a, model, tok, meta)
        return
    rows: dict[str, list[dict]] = {name: [] for name in POLICIES}
    for fam in a.families:
        gen = get_family(fam).gen_length
        probs = make_problems(fam, "test", a.n, seed=meta.get("data_seed", 0), tokenizer=tok,
                              gen_length=gen)
        for name, (kind, kw) in POLICIES.items():
            args = dict(kw)
            if kind == "llada":
                args["steps"] = gen  # one token per step, as Fast-dLLM's baseline
                args["block_length"] = min(args["block_length"], gen)
            if kind in ("fastdllm", "eb", "wino"):
                args["block_length"] = min(args["block_length"], gen)
            policy = make_policy(kind, **args)
            with torch.inference_mode():
                decode_problems(model, tok, probs[:1], policy, gen)  # warm-up, not timed
            rows[name] += _decode_shard(model, tok, probs, policy, gen, 1, a.shard)
    if a.shard[0]:
        return  # rank 0 prints and writes
    print(f"checkpoint {a.ckpt}; {a.n} held-out problems x {len(a.families)} families, batch 1, "
          f"greedy, threads {torch.get_num_threads()}, processes {a.shard[1]}")
    print(f"{'policy':24} {'acc':>6} {'NFE':>7} {'bound':>6} {'wall s':>8} {'tok/s':>8}")
    summary = {name: _summary(rs) for name, rs in rows.items()}
    for name, s in summary.items():
        print(f"{name:24} {s['correct']:6.3f} {s['nfe']:7.2f} {s['lower_bound']:6.2f} "
              f"{s['wall']:8.2f} {s['tok_s']:8.1f}")
    print("\nper family: accuracy / mean NFE")
    print(f"{'family':16}" + "".join(f"{n:>24}" for n in POLICIES))
    per_family = {}
    for fam in a.families:
        per_family[fam] = {n: _summary([r for r in rs if r["family"] == fam])
                           for n, rs in rows.items()}
        print(f"{fam:16}" + "".join(f"{s['correct']:>14.3f} / {s['nfe']:6.2f}"
                                    for s in per_family[fam].values()))
    f, ad, ll = summary["fastdllm"], summary["adaptive"], summary["llada"]
    print(f"\nNFE fastdllm / adaptive: {f['nfe'] / ad['nfe']:.2f} "
          f"(accuracy {ad['correct']:.3f} vs {f['correct']:.3f})")
    print(f"wall llada / fastdllm: {ll['wall'] / f['wall']:.1f}x; "
          f"llada / adaptive: {ll['wall'] / ad['wall']:.1f}x (llada steps = gen_length, "
          "same gen lengths)")
    print(f"throughput adaptive vs fastdllm: {100 * (ad['tok_s'] / f['tok_s'] - 1):+.1f}%; "
          f"accuracy {100 * (ad['correct'] - f['correct']):+.1f} points")
    print("ablation (full adaptive minus the variant without the component):")
    for name in ("adaptive-no-block", "adaptive-no-threshold", "adaptive-no-cache",
                 "adaptive-prefix-cache"):
        s = summary[name]
        print(f"  {name:24} accuracy {100 * (ad['correct'] - s['correct']):+.1f} points, "
              f"throughput {100 * (ad['tok_s'] / s['tok_s'] - 1):+.1f}%, "
              f"NFE {s['nfe']:.2f} -> {ad['nfe']:.2f}")
    print("the seed's presets against fastdllm (the defaults above are its code preset):")
    for name in ("adaptive-math", "adaptive-creative"):
        s = summary[name]
        print(f"  {name:24} NFE fastdllm / preset {f['nfe'] / s['nfe']:.2f}, accuracy "
              f"{s['correct']:.3f} vs {f['correct']:.3f}, wall llada / preset "
              f"{ll['wall'] / s['wall']:.1f}x")
    b16, a32 = summary["fastdllm-block16"], summary["adaptive-block32"]
    print(f"block-size controls: fastdllm at block 16 accuracy {b16['correct']:.3f} (NFE "
          f"{b16['nfe']:.2f}) vs block 32 {f['correct']:.3f}; adaptive from block 32 "
          f"{a32['correct']:.3f} (NFE {a32['nfe']:.2f}) vs from 16 {ad['correct']:.3f}")
    c, f7 = summary["adaptive-creative"], summary["fastdllm-tau0.7"]
    print(f"static control at the creative preset's starting τ 0.7: NFE fastdllm-tau0.7 / "
          f"creative {f7['nfe'] / c['nfe']:.2f}, accuracy {c['correct']:.3f} vs "
          f"{f7['correct']:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"ckpt": a.ckpt, "n": a.n, "threads": torch.get_num_threads(),
                       "processes": a.shard[1], "summary": summary,
                       "per_family": per_family}, fh, indent=1)


if __name__ == "__main__":
    main()
