"""q* sampling speed against running the two models' forwards alone, side by side in one run.

    python benchmarks/qstar_throughput.py [--theta zoo:qwen2.5-coder-0.5b-instruct]
        [--t zoo:qwen2.5-coder-1.5b-instruct] [--max_new_tokens 32] [--reps 2]

Three decoders share the one decode loop, the same prompts, greedy decoding and the same
number of new tokens per request (EOS is ignored so that every run does the same work):
``forwards`` runs both models and takes π_θ's argmax (no mixing: the floor of any q* sampler),
``fixed`` mixes with α = 0.5, ``kl_symmetry`` solves α per token. Runs alternate and the
median of ``--reps`` is reported. Goals (issue 5): q* tokens/s ≥ 0.85 × ``forwards``;
kl_symmetry time ≤ 1.10 × fixed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.generation.base import DecodingConfig
from toolkit.generation.decode_loop import DecodeLoop
from toolkit.qstar.sampler import QStarSampler

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "Write a function to reverse a linked list.",
    "What is 23 * 47? Think step by step.",
    "Write a SQL query that counts orders per customer.",
    "Give three uses of Python decorators.",
    "Write a function that merges two sorted lists.",
    "Explain recursion to a beginner.",
]


def forwards_picker(logits, config, rows):
    return logits[0].argmax(-1), torch.log_softmax(logits[0], -1), {}


def run(q: QStarSampler, mode: str, prompts: list[str], cfg: DecodingConfig) -> float:
    ids = [q.theta.encode(p, cfg) for p in prompts]
    if mode == "forwards":
        picker = forwards_picker
    else:
        q.alpha_method = mode
        picker = q.picker
    # No EOS: every run generates exactly max_new_tokens per request.
    loop = DecodeLoop([q.theta.model, q.t.model], q.theta.tokenizer.pad_token_id, [],
                      q.theta.device, picker=picker)
    t0 = time.perf_counter()
    outs = loop.run(ids, [cfg.max_new_tokens] * len(ids), list(range(len(ids))), cfg,
                    max_active=len(ids))
    return sum(o.generated_tokens for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--theta", default="zoo:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--t", default="zoo:qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    q = QStarSampler(a.theta, a.t, "fixed")
    cfg = DecodingConfig(max_new_tokens=a.max_new_tokens, token_stats=True)
    run(q, "fixed", PROMPTS[:1], DecodingConfig(max_new_tokens=2))  # warm-up
    print(f"θ {q.theta.info.slug}, t {q.t.info.slug}, threads {torch.get_num_threads()}, "
          f"{a.max_new_tokens} new tokens, greedy")
    print(f"{'batch':>5} {'forwards':>9} {'fixed':>7} {'kl_sym':>7} {'fixed/fwd':>9} "
          f"{'kl/fwd':>7} {'kl time/fixed':>13}")
    for bs in (1, 8):
        rates: dict[str, list[float]] = {"forwards": [], "fixed": [], "kl_symmetry": []}
        for _ in range(a.reps):
            for mode in rates:
                rates[mode].append(run(q, mode, PROMPTS[:bs], cfg))
        m = {k: statistics.median(v) for k, v in rates.items()}
        print(f"{bs:>5} {m['forwards']:>9.2f} {m['fixed']:>7.2f} {m['kl_symmetry']:>7.2f} "
              f"{m['fixed'] / m['forwards']:>9.2f} {m['kl_symmetry'] / m['forwards']:>7.2f} "
              f"{m['fixed'] / m['kl_symmetry']:>13.2f}")


if __name__ == "__main__":
    main()
