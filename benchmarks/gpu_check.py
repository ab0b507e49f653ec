"""One command that checks the toolkit on a CUDA GPU and writes one JSON (never run on a GPU yet).

    PYTHONPATH=. python benchmarks/gpu_check.py [--out docs/results/gpu_check.json]
    PYTHONPATH=. python benchmarks/gpu_check.py --dry_run --out /tmp/gpu_check.json

Status: written and tested without a GPU. No session so far has had one, so this script has
only ever run as ``--dry_run`` (the same code paths on tiny shapes, on CPU;
``tests/shared/test_gpu_check.py`` runs it that way). Its numbers mean nothing until it runs
on CUDA.

What it measures, in one JSON (sections run in this order; each records its own time and the
peak GPU memory, and a section that fails records its error while the others still run):

* ``conformance``: the generation-backend conformance checks
  (``toolkit/generation/conformance.py``, the ones
  ``tests/shared/test_backend_conformance.py`` runs)
  on CUDA, with the tiny random models of ``toolkit/models/tiny.py`` in float32;
* ``generation``: bf16 tokens/s of our backend (``TransformersBackend``, continuous batching,
  per-token statistics on) against ``model.generate`` at batch 1 and 8, on a randomly
  initialised model of Qwen2.5-1.5B's shape (speed only: random weights, meaningless text);
* ``qstar``: q* tokens/s at batch 8 (π_θ of Qwen2.5-0.5B's shape, π_t of 1.5B's, sharing one
  tokenizer) for the two models' forwards alone, fixed α and kl_symmetry α, and the time of one
  α solve on real [8, vocab] logits, kl_symmetry against fixed;
* ``dllm``: diffusion decoding on a randomly initialised LLaDA-shaped ~1B model: time per
  forward, and the speed-ups of the KV caches (prefix, dual, the adaptive policy's tiered
  cache) over the same policy without a cache, at batch 1 and 8.

Constraints it is written for (the GPU machine lent to this project): Python 3.12, torch,
transformers and nothing that can be installed; no pytest, jsonargparse, fastapi or lightning
needed (``tests/shared/test_gpu_check.py`` runs it with those imports blocked); no network, no real
weights: every model is built from a config on the device, saved to a temporary folder and
loaded through the toolkit's own loader; the tokenizer is the tiny in-memory BPE of
``toolkit/models/tiny.py`` (the big models keep their real vocabulary sizes, so ids beyond the
tokenizer decode to nothing, which speed does not care about). A full run is sized to finish in
well under 8 minutes on one H100/H200 (``--budget_s`` skips sections that would start late).
Exit status: 0 when every section ran and every conformance check passed, 1 otherwise, 2 when
there is no CUDA device (without ``--dry_run``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Nothing is downloaded: models are built from configs, the tokenizer is trained in memory. On
# a machine without network this also spares transformers' hub look-ups and their timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.generation_throughput import PROMPTS, ours_tokens, plain_tokens  # noqa: E402
from benchmarks.qstar_throughput import run as qstar_run  # noqa: E402
from toolkit.common.io import atomic_write_json  # noqa: E402
from toolkit.generation.base import DecodingConfig  # noqa: E402

# Qwen2.5-1.5B / 0.5B (1.54B / 0.49B parameters) and a ~1B LLaDA: TinyLlama-like widths with
# LLaDA's vocabulary and mask id (1.13B non-embedding parameters, 1.65B in all).
FULL: dict[str, Any] = {
    "qwen_1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                      num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                      max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen_0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                      max_position_embeddings=32768, tie_word_embeddings=True),
    "llada_1b": dict(d_model=2048, n_heads=16, n_layers=22, mlp_hidden_size=5632,
                     vocab_size=126464, mask_token_id=126336, eos_token_id=126081,
                     max_sequence_length=4096),
    "gen_tokens": 128, "gen_reps": 3, "qstar_tokens": 64, "qstar_reps": 2, "alpha_calls": 50,
    "dllm_prompt": 128, "dllm_gen": 256, "dllm_block": 32, "dllm_batches": (1, 8),
}
# The same code paths on shapes a CPU runs in seconds; the vocabulary is larger than the tiny
# tokenizer's (384) on purpose, as it is for the real shapes.
DRY: dict[str, Any] = {
    "qwen_1.5b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=512, tie_word_embeddings=True),
    "qwen_0.5b": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=512, tie_word_embeddings=True),
    "llada_1b": dict(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=512,
                     mask_token_id=511, eos_token_id=510, max_sequence_length=256),
    "gen_tokens": 8, "gen_reps": 1, "qstar_tokens": 8, "qstar_reps": 1, "alpha_calls": 3,
    "dllm_prompt": 8, "dllm_gen": 16, "dllm_block": 8, "dllm_batches": (1, 2),
}
SPEED_ONLY = ("speed only: randomly initialised weights (no real checkpoint exists on the GPU "
              "machine), so the text is meaningless and only times are reported")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_causal_lm(folder: Path, shape: dict[str, Any], device: torch.device,
                    seed: int) -> dict[str, Any]:
    """A random Qwen2 model of ``shape`` in bf16, built on ``device``, saved with the tiny
    tokenizer into ``folder`` (so the toolkit's loader reads it like any model folder)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from toolkit.models.tiny import make_tiny_tokenizer

    t0 = time.perf_counter()
    tok = make_tiny_tokenizer(folder)
    cfg = Qwen2Config(**shape, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the GPU: seconds instead of minutes on CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"shape": shape, "params": params, "build_and_save_s": time.perf_counter() - t0}


def check_conformance(device: torch.device, work: Path) -> dict[str, Any]:
    from toolkit.generation.conformance import CHECKS
    from toolkit.generation.hf_backend import TransformersBackend
    from toolkit.models.tiny import make_tiny_causal_lm

    backend = TransformersBackend(str(make_tiny_causal_lm(work / "tiny", seed=0)),
                                  device=str(device))
    checks = {}
    for name, check in CHECKS.items():
        try:
            check(backend)
            checks[name] = {"passed": True}
        except Exception as err:  # a failed check is a result, not a crash of the whole run
            checks[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"[:2000]}
    return {"backend": "transformers", "dtype": "float32", "checks": checks,
            "all_passed": all(c["passed"] for c in checks.values())}


def _median_rates(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, float]:
    """Median of ``reps`` rates per name, the names alternating (ours, plain, ours, ...)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            rates[name].append(fn())
    return {name: statistics.median(r) for name, r in rates.items()}


def bench_generation(device: torch.device, work: Path, p: dict[str, Any]) -> dict[str, Any]:
    from toolkit.generation.hf_backend import TransformersBackend

    model = build_causal_lm(work / "qwen_1.5b", p["qwen_1.5b"], device, seed=1)
    t0 = time.perf_counter()
    backend = TransformersBackend(str(work / "qwen_1.5b"), dtype="bfloat16", device=str(device))
    load_s = time.perf_counter() - t0
    cfg = DecodingConfig(max_new_tokens=p["gen_tokens"], token_stats=True, top_logprobs=5)
    warm = DecodingConfig(max_new_tokens=4)
    ours_tokens(backend, PROMPTS[:2], warm)
    plain_tokens(backend, PROMPTS[:2], warm)

    def rate(fn: Callable[..., int], prompts: list[str]) -> Callable[[], float]:
        def timed() -> float:
            t = time.perf_counter()
            n = fn(backend, prompts, cfg)
            return n / (time.perf_counter() - t)
        return timed

    batches = {}
    for bs in (1, 8):
        m = _median_rates({"ours": rate(ours_tokens, PROMPTS[:bs]),
                           "model_generate": rate(plain_tokens, PROMPTS[:bs])}, p["gen_reps"])
        batches[str(bs)] = {"ours_tokens_per_s": m["ours"],
                            "model_generate_tokens_per_s": m["model_generate"],
                            "ours_over_generate": m["ours"] / m["model_generate"]}
    return {"note": SPEED_ONLY + "; ours records per-token statistics (log-prob, top-1, "
            "entropy, top-5), model.generate does not; greedy; median of reps, alternating",
            "model": {**model, "non_embedding_params": backend.info.non_embedding_params},
            "dtype": "bfloat16", "load_s": load_s, "max_new_tokens": p["gen_tokens"],
            "reps": p["gen_reps"], "batches": batches}


def bench_qstar(device: torch.device, work: Path, p: dict[str, Any]) -> dict[str, Any]:
    from toolkit.qstar.alpha import solve_alpha
    from toolkit.qstar.sampler import QStarSampler

    theta = build_causal_lm(work / "qwen_0.5b", p["qwen_0.5b"], device, seed=2)
    if not (work / "qwen_1.5b" / "config.json").exists():  # the generation section made it
        build_causal_lm(work / "qwen_1.5b", p["qwen_1.5b"], device, seed=1)
    q = QStarSampler(str(work / "qwen_0.5b"), str(work / "qwen_1.5b"), "fixed",
                     dtype="bfloat16", device=str(device))
    cfg = DecodingConfig(max_new_tokens=p["qstar_tokens"], token_stats=True)
    prompts = PROMPTS[:8]
    qstar_run(q, "fixed", prompts[:1], DecodingConfig(max_new_tokens=2))  # warm-up
    qstar_run(q, "kl_symmetry", prompts[:1], DecodingConfig(max_new_tokens=2))
    modes = ("forwards", "fixed", "kl_symmetry")
    m = _median_rates({mode: (lambda mode=mode: qstar_run(q, mode, prompts, cfg))
                       for mode in modes}, p["qstar_reps"])
    # One α solve on the models' real next-token logits for the 8 prompts, timed alone.
    ids = [q.theta.encode(s, cfg) for s in prompts]
    width = max(len(i) for i in ids)
    batch = torch.tensor([[q.theta.tokenizer.pad_token_id] * (width - len(i)) + i for i in ids],
                         device=device)
    mask = (torch.arange(width, device=device)[None] >= torch.tensor(
        [width - len(i) for i in ids], device=device)[:, None]).long()
    with torch.inference_mode():
        logits = [mdl(input_ids=batch, attention_mask=mask).logits[:, -1]
                  for mdl in (q.theta.model, q.t.model)]
    solve: dict[str, dict[str, float]] = {}
    for method in ("fixed", "kl_symmetry"):
        times, iters = [], 0
        for _ in range(p["alpha_calls"] + 1):  # the first call is a warm-up
            _sync(device)
            t0 = time.perf_counter()
            res = solve_alpha(logits[0], logits[1], method)
            _sync(device)
            times.append(time.perf_counter() - t0)
            iters = res.iterations
        solve[method] = {"ms_per_solve": 1000 * statistics.median(times[1:]),
                         "iterations": int(iters)}
    return {"note": SPEED_ONLY + "; greedy, EOS ignored (every run makes max_new_tokens per "
            "request); 'forwards' runs both models and takes π_θ's argmax (no mixing)",
            "theta": theta, "t": {"shape": p["qwen_1.5b"], "same_model_as": "generation"},
            "dtype": "bfloat16", "batch": len(prompts), "max_new_tokens": p["qstar_tokens"],
            "reps": p["qstar_reps"],
            "tokens_per_s": m, "fixed_over_forwards": m["fixed"] / m["forwards"],
            "kl_symmetry_over_forwards": m["kl_symmetry"] / m["forwards"],
            "kl_symmetry_time_over_fixed": m["fixed"] / m["kl_symmetry"],
            "alpha_solve": {"vocab": int(logits[0].shape[-1]), **solve,
                            "kl_symmetry_over_fixed": solve["kl_symmetry"]["ms_per_solve"]
                            / solve["fixed"]["ms_per_solve"]}}


DLLM_POLICIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llada": ("llada", {}),  # one token per step, no cache: the reference
    "fastdllm_nocache": ("fastdllm", {"threshold": 0.9, "cache": "none"}),
    "fastdllm_prefix": ("fastdllm", {"threshold": 0.9, "cache": "prefix"}),
    "fastdllm_dual": ("fastdllm", {"threshold": 0.9, "cache": "dual"}),
    "adaptive_nocache": ("adaptive", {"tiered_cache": False, "cache": "none"}),
    "adaptive_tiered": ("adaptive", {}),
}
# Each cached policy against the same policy without a cache: the speed-up of the cache alone.
CACHE_PAIRS = {"fastdllm_prefix": "fastdllm_nocache", "fastdllm_dual": "fastdllm_nocache",
               "adaptive_tiered": "adaptive_nocache"}


def bench_dllm(device: torch.device, p: dict[str, Any]) -> dict[str, Any]:
    from toolkit.dllm.decoding import decode
    from toolkit.dllm.llada_model import LLaDAConfig, LLaDAModelLM
    from toolkit.dllm.registry import make_policy

    cfg = LLaDAConfig(**p["llada_1b"])
    t0 = time.perf_counter()
    torch.manual_seed(3)
    with torch.device(device):  # random init on the GPU
        model = LLaDAModelLM.from_config(cfg, dtype=torch.bfloat16).eval()
    build_s = time.perf_counter() - t0
    gen, block = p["dllm_gen"], p["dllm_block"]
    prompts = torch.randint(3, min(cfg.mask_token_id, 1000),
                            (max(p["dllm_batches"]), p["dllm_prompt"]),
                            generator=torch.Generator().manual_seed(0)).tolist()

    def policy(name: str, length: int) -> Any:
        kind, kw = DLLM_POLICIES[name]
        kw = dict(kw)
        if kind != "adaptive":
            kw["block_length"] = min(block, length)
        if kind == "llada":
            kw["steps"] = length
        return make_policy(kind, **kw)

    def run(name: str, rows: int, length: int) -> Any:
        return decode(model, prompts[:rows], length, policy(name, length),
                      mask_id=cfg.mask_token_id, stop_at_eos=False, device=device)

    for name in DLLM_POLICIES:  # warm-up: every forward shape once
        run(name, 1, block)
    batches: dict[str, Any] = {}
    for rows in p["dllm_batches"]:
        res = {name: run(name, rows, gen) for name in DLLM_POLICIES}
        out = {name: {"wall_s": r.wall_time_s, "batch_forwards_full": r.batch_forwards_full,
                      "batch_forwards_cached": r.batch_forwards_cached,
                      "ms_per_forward": 1000 * r.wall_time_s / max(r.batch_nfe, 1),
                      "mean_nfe": sum(r.nfe) / len(r.nfe),
                      "answer_tokens_per_s": r.tokens_per_second,
                      "cache_hit_rate": r.cache_hit_rate} for name, r in res.items()}
        batches[str(rows)] = {
            "policies": out,
            "cache_speedup": {c: res[b].wall_time_s / res[c].wall_time_s
                              for c, b in CACHE_PAIRS.items()},
            "speedup_over_llada": {n: res["llada"].wall_time_s / r.wall_time_s
                                   for n, r in res.items() if n != "llada"}}
    return {"note": SPEED_ONLY + "; with random weights no prediction is confident, so the "
            "threshold policies commit about one token per forward like the reference: the "
            "speed-ups are the caches' (cheaper forwards), not parallel decoding; greedy, no "
            "EOS stop",
            "model": {"config": p["llada_1b"],
                      "params": sum(x.numel() for x in model.parameters()),
                      "build_s": build_s},
            "dtype": "bfloat16", "prompt_tokens": p["dllm_prompt"], "gen_length": gen,
            "block_length": block, "batches": batches}


def environment(device: torch.device, dry_run: bool) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {"dry_run": dry_run, "device": str(device),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__,
                           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(gpu=prop.name, gpu_memory_GiB=prop.total_memory / 2**30,
                   capability=f"{prop.major}.{prop.minor}", cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="the JSON to write (default "
                    "docs/results/gpu_check.json; with --dry_run, gpu_check_dry_run.json in "
                    "the system's temporary folder)")
    ap.add_argument("--dry_run", action="store_true",
                    help="tiny shapes on CPU: the same code paths, numbers that mean nothing")
    ap.add_argument("--budget_s", type=float, default=420.0,
                    help="skip any section that would start after this many seconds")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry_run checks the code paths on CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:  # tiny shapes: more CPU threads only add synchronisation (10x slower on 2 cores)
        torch.set_num_threads(1)
    p = DRY if a.dry_run else FULL
    out = Path(a.out or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if a.dry_run
                         else "docs/results/gpu_check.json"))
    report: dict[str, Any] = {"environment": environment(device, a.dry_run)}
    start = time.perf_counter()
    failed = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        sections: dict[str, Callable[[], dict[str, Any]]] = {
            "conformance": lambda: check_conformance(device, work),
            "generation": lambda: bench_generation(device, work, p),
            "qstar": lambda: bench_qstar(device, work, p),
            "dllm": lambda: bench_dllm(device, p),
        }
        for name, fn in sections.items():
            if time.perf_counter() - start > a.budget_s:
                report[name] = {"status": "skipped", "reason": f"past --budget_s {a.budget_s}"}
                failed = True
                continue
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            try:
                res = {"status": "ok", **fn()}
            except Exception as err:  # record it and go on: one broken part must not hide the rest
                res = {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000],
                       "traceback": traceback.format_exc(limit=8)[-4000:]}
                failed = True
            res["seconds"] = time.perf_counter() - t0
            if device.type == "cuda":
                res["peak_gpu_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.empty_cache()
            failed |= res.get("all_passed") is False
            report[name] = res
            report["total_seconds"] = time.perf_counter() - start
            atomic_write_json(out, report)  # after every section: a killed run keeps the rest
            print(f"gpu_check: {name} {res['status']} in {res['seconds']:.1f} s", file=sys.stderr,
                  flush=True)
    print(f"gpu_check: wrote {out}" + (" (some parts failed)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
