"""Our generation backend against plain ``model.generate``, side by side in one run.

    python benchmarks/generation_throughput.py [--model zoo:smollm2-135m-instruct] [--reps 3]

Both decode the same chat prompts greedily with the same weights and threads; ours records
per-token statistics (chosen log-prob, top-1, full-distribution entropy, top-5). Generated
tokens are counted up to and including each row's EOS for both. Runs alternate (ours, plain,
ours, ...) and the median of ``--reps`` runs is reported, because this machine is noisy.
Goal (issue 2): ours / plain >= 0.9 at batch 1 and batch 8.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.generation.base import DecodingConfig, GenerationRequest
from toolkit.generation.hf_backend import TransformersBackend

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List five fruits and one fact about each.",
    "What is 17 times 23? Show your work.",
    "Write a short poem about autumn leaves.",
    "Give three tips for writing clean code.",
    "Describe how a bicycle works.",
    "Translate 'good morning, how are you?' into French and Spanish.",
]


def plain_tokens(backend: TransformersBackend, prompts: list[str], cfg: DecodingConfig) -> int:
    tok = backend.tokenizer
    enc = tok([backend.render(p, cfg) for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False).to(backend.device)  # the model's device (GPU check)
    with torch.inference_mode():
        out = backend.model.generate(**enc, do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                     pad_token_id=tok.pad_token_id)
    gen = out[:, enc["input_ids"].shape[1]:]
    n = 0
    for row in gen.tolist():
        ends = [i for i, t in enumerate(row) if t in backend.eos_ids]
        n += ends[0] + 1 if ends else len(row)
    return n


def ours_tokens(backend: TransformersBackend, prompts: list[str], cfg: DecodingConfig) -> int:
    outs = backend.generate([GenerationRequest(p) for p in prompts], cfg, batch_size=len(prompts))
    return sum(o.generated_tokens for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:smollm2-135m-instruct")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    backend = TransformersBackend(a.model, threads=a.threads)
    cfg = DecodingConfig(max_new_tokens=a.max_new_tokens, token_stats=True, top_logprobs=5)
    ours_tokens(backend, PROMPTS[:2], DecodingConfig(max_new_tokens=4))  # warm-up
    print(f"model {backend.info.slug}, threads {torch.get_num_threads()}, "
          f"max_new_tokens {a.max_new_tokens}, token stats on")
    print(f"{'batch':>5} {'ours tok/s':>11} {'plain tok/s':>12} {'ratio':>6}")
    for bs in (1, 8):
        prompts = PROMPTS[:bs]
        rates: dict[str, list[float]] = {"ours": [], "plain": []}
        for _ in range(a.reps):
            for name, fn in (("ours", ours_tokens), ("plain", plain_tokens)):
                t0 = time.perf_counter()
                n = fn(backend, prompts, cfg)
                rates[name].append(n / (time.perf_counter() - t0))
        ours, plain = statistics.median(rates["ours"]), statistics.median(rates["plain"])
        print(f"{bs:>5} {ours:>11.1f} {plain:>12.1f} {ours / plain:>6.2f}")


if __name__ == "__main__":
    main()
