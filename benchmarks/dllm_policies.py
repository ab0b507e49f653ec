"""All diffusion decoding policies on the same held-out problems, side by side in one run.

    python benchmarks/dllm_policies.py [--ckpt checkpoints/dllm/small/model.ckpt] [--n 20]

For each family the toolkit's small diffusion LM was trained on (short answers), the same
held-out problems are decoded by every policy, one after the other, batch 1, greedy:
``llada`` (reference, steps = gen_length, block 32: Fast-dLLM's baseline), ``fastdllm``
(block 32, τ 0.9, prefix cache), ``adaptive`` (the seed's defaults) and its ablations. Reports
accuracy, mean NFE (with the lower bound ceil(L_eff/B) beside it) and wall time, and the
ratios the issue asks for: NFE fastdllm / adaptive (goal ≥ 1.3 at equal or better accuracy)
and wall llada / fastdllm and llada / adaptive (goal ≥ 5, at the same gen length).
"""

from __future__ import annotations

import argparse

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
    "adaptive-no-cache": ("adaptive", {"tiered_cache": False}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="checkpoints/dllm/small/model.ckpt")
    ap.add_argument("--n", type=int, default=20, help="held-out problems per family")
    ap.add_argument("--families", nargs="*",
                    default=["spell_backward", "word_sorting", "number_sorting", "chain_sum"])
    a = ap.parse_args()
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
            with torch.inference_mode():
                rows[name] += decode_problems(model, tok, probs, make_policy(kind, **args), gen)
    print(f"checkpoint {a.ckpt}; {a.n} held-out problems x {len(a.families)} families, batch 1, "
          f"greedy, threads {torch.get_num_threads()}")
    print(f"{'policy':24} {'acc':>6} {'NFE':>7} {'bound':>6} {'wall s':>8}")
    summary = {}
    for name, rs in rows.items():
        s = {k: float(np.mean([r[k] for r in rs])) for k in ("correct", "nfe", "lower_bound")}
        s["wall"] = float(np.sum([r["wall_s"] for r in rs]))
        summary[name] = s
        print(f"{name:24} {s['correct']:6.3f} {s['nfe']:7.1f} {s['lower_bound']:6.1f} "
              f"{s['wall']:8.1f}")
    f, ad, ll = summary["fastdllm"], summary["adaptive"], summary["llada"]
    print(f"NFE fastdllm / adaptive: {f['nfe'] / ad['nfe']:.2f} "
          f"(accuracy {ad['correct']:.3f} vs {f['correct']:.3f})")
    print(f"wall llada / fastdllm: {ll['wall'] / f['wall']:.1f}x; "
          f"llada / adaptive: {ll['wall'] / ad['wall']:.1f}x (same gen lengths)")


if __name__ == "__main__":
    main()
