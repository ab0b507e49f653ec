"""All diffusion decoding policies on the same held-out problems, side by side in one run.

    python benchmarks/dllm_policies.py [--ckpt checkpoints/dllm/small/model.ckpt] [--n 50]

For each family the toolkit's small diffusion LM was trained on (short answers), the same
held-out problems are decoded by every policy, one after the other, batch 1, greedy:
``llada`` (reference, steps = gen_length, block 32: Fast-dLLM's baseline), ``fastdllm``
(block 32, τ 0.9, prefix cache), ``adaptive`` (the seed's defaults = its code preset, B 16,
τ 0.8), its ablations (no block sizing, no threshold adaptation, no cache at all, Fast-dLLM's
prefix cache instead of the tiered one), the seed's presets math (B 8, τ 0.9) and creative
(B 32, τ 0.7), and a static control for the latter (fastdllm at τ 0.7). Reports accuracy,
mean NFE (with the lower bound ceil(L_eff/B) beside it), wall time and answer tokens per
second (after one untimed warm-up problem per policy), and the ratios the issue asks for:
NFE fastdllm / adaptive (goal ≥ 1.3 at equal or better accuracy) and wall llada / fastdllm
and llada / adaptive (goal ≥ 5, at the same gen length).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from toolkit.dllm.eval_module import decode_problems
from toolkit.dllm.policies import make_policy
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
}


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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, meta = load_diffusion_checkpoint_with_meta(a.ckpt)
    model.eval()
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
            if kind == "fastdllm":
                args["block_length"] = min(args["block_length"], gen)
            policy = make_policy(kind, **args)
            with torch.inference_mode():
                decode_problems(model, tok, probs[:1], policy, gen)  # warm-up, not timed
                rows[name] += decode_problems(model, tok, probs, policy, gen)
    print(f"checkpoint {a.ckpt}; {a.n} held-out problems x {len(a.families)} families, batch 1, "
          f"greedy, threads {torch.get_num_threads()}")
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
    c, f7 = summary["adaptive-creative"], summary["fastdllm-tau0.7"]
    print(f"static control at the creative preset's starting τ 0.7: NFE fastdllm-tau0.7 / "
          f"creative {f7['nfe'] / c['nfe']:.2f}, accuracy {c['correct']:.3f} vs "
          f"{f7['correct']:.3f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"ckpt": a.ckpt, "n": a.n, "threads": torch.get_num_threads(),
                       "summary": summary, "per_family": per_family}, fh, indent=1)


if __name__ == "__main__":
    main()
