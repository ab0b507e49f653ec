"""``python cli.py generate``: plain or q* generation into OpenAI-format JSONL, resumable.

One output row per sample::

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "finish_reason": "stop" | "length", "sample_idx": 0,
     "original_<field>": ...}                       (every other field of the source row)

and, beside it, ``<output>.diagnostics.jsonl`` with one row per sample (α, ESS ratio and both
KLs averaged over the sample's tokens, and the fractions of tokens meeting the seed's
theoretical conditions) when q* is used. When sampling (temperature > 0) each row also holds the
sequence log importance weights ``log_weight`` = Σ_t log π_θ(y_t)/q(y_t) and ``log_weight_t`` =
Σ_t log π_t(y_t)/q(y_t), against the exact per-token q the tokens were drawn from (after
top-k/top-p; the models at the same temperature); SFT's optional weighting reads ``log_weight``.

Resuming. Batches are fixed by sample index (batch b = samples b·B … b·B+B−1) and every
sample draws from its own generator seeded by (seed, sample_idx), so a rerun regenerates a lost
batch exactly. Each batch is appended to the output in one fsync'd write (the output is the
authority on what is done); the diagnostics file is written first and cut back to the output's
samples on resume. A file made with another configuration is refused, never mixed.

Sharding. ``--shard k/n`` makes batches b with b mod n = k only, into
``<output>.shard-k-of-n.jsonl`` (each shard resumable on its own), so n processes or machines
can share one set. A later run without ``--shard``
first moves the finished rows of every shard file with the same configuration into the output
(diagnostics first, rows in sample order, each shard file removed once its rows are in), then
makes whatever is still missing (run it after the shard processes end). The content is the
same as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.common.errors import UserError
from toolkit.common.io import JsonlAppender, atomic_write_text, lock_path, read_jsonl
from toolkit.generation.base import DecodingConfig, GenerationRequest

DIAG_KEYS = ("alpha", "ess_ratio", "kl_theta", "kl_t")


def diagnostics_path(output: Path) -> Path:
    return output.with_name(output.stem + ".diagnostics.jsonl")


class GenerateConfigError(UserError, ValueError):
    """A generate option that cannot work (reported as one line by the CLI)."""


def _parse_shard(shard: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise GenerateConfigError(f"--shard must look like k/n (e.g. 0/2), got {shard!r}") from None
    if not 0 <= k < n:
        raise GenerateConfigError(f"--shard {shard}: need 0 <= k < n")
    return k, n


def shard_path(output: Path, k: int, n: int) -> Path:
    return output.with_name(f"{output.stem}.shard-{k}-of-{n}{output.suffix}")


def _absorb_shards(out_path: Path, writer: JsonlAppender, diags: JsonlAppender | None,
                   config: dict[str, Any], done: set[int]) -> None:
    """Move the rows of shard files (same configuration) into the output, in sample order."""
    paths = [p for p in sorted(out_path.parent.glob(f"{out_path.stem}.shard-*-of-*"
                                                    f"{out_path.suffix}"))
             if not p.name.endswith(".diagnostics.jsonl")]
    rows: dict[int, dict[str, Any]] = {}
    drows: dict[int, dict[str, Any]] = {}
    shards = []
    for path in paths:
        # Refuses another configuration, and a shard whose process is still writing it.
        shard = JsonlAppender(path, "sample_idx", config)
        shards.append(shard)
        rows.update((r["sample_idx"], r) for r in shard.rows() if r["sample_idx"] not in done)
        if diagnostics_path(path).exists():
            drows.update((d["sample_idx"], d) for d in read_jsonl(diagnostics_path(path)))
    new = sorted(rows)
    if diags is not None:  # diagnostics first: a kill in between is cut back on resume
        diags.append([drows[i] for i in new if i in drows])
    writer.append([rows[i] for i in new])
    done.update(new)
    for path, shard in zip(paths, shards):
        for leftover in (path, diagnostics_path(path), path.with_name(path.name + ".meta.json"),
                         lock_path(path), lock_path(diagnostics_path(path))):
            leftover.unlink(missing_ok=True)
        shard.close()


def _sample_diagnostics(idx: int, out: Any, sampled: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"sample_idx": idx, "tokens": out.generated_tokens}
    for key, name in (("logw_theta", "log_weight"), ("logw_t", "log_weight_t")):
        arr = out.extra.get(key)
        if sampled and arr is not None:  # greedy output was not drawn from q: no weight
            row[name] = float(np.sum(np.asarray(arr, dtype=np.float64)))
    for key in DIAG_KEYS:
        arr = out.extra.get(key)
        if arr is not None and len(arr):
            row[f"{key}_mean"] = float(np.mean(arr))
    for key, arr in out.extra.items():
        if key.startswith("meets_") and len(arr):
            row[f"frac_{key}"] = float(np.mean(arr))
    return row


def generate(dataset: str, output: str, model: str | None = None,
             model_theta: str | None = None, model_t: str | None = None,
             alpha_method: str = "kl_symmetry", fixed_alpha: float = 0.5,
             num_samples: int | None = None, batch_size: int = 8,
             decoding: DecodingConfig | None = None, prompt_field: str | None = None,
             reference_field: str | None = None, dtype: str = "float32",
             device: str = "cpu", save_diagnostics: bool = True,
             shard: str | None = None) -> dict[str, Any]:
    """Generate one answer per prompt of a dataset, with one model or with q* of two.

    Args:
        dataset: a task name (humaneval, gsm_symbolic), a .jsonl/.json/.parquet file, or a hub
            id (online); the prompt field is detected (prompt, question, instruction, problem,
            input, query, or OpenAI messages) unless prompt_field is given.
        output: the JSONL file to write (resumable).
        model: plain generation with this model (zoo:<slug>, folder or hub id).
        model_theta: q*: π_θ (the current policy).
        model_t: q*: π_t (the target); must share π_θ's tokenizer.
        alpha_method: q*: fixed | entropy | kl_symmetry.
        fixed_alpha: q*: α for the fixed method.
        num_samples: the first N prompts (all when null).
        batch_size: samples per batch (and per resumable write).
        decoding: temperature, top-p, top-k, max_new_tokens, seed, ...
        prompt_field: override prompt-field detection.
        reference_field: override reference-field detection.
        dtype: weights dtype.
        device: cpu or cuda.
        save_diagnostics: write <output>.diagnostics.jsonl (q* only).
        shard: k/n: make only batches b with b mod n = k, into <output>.shard-k-of-n.jsonl;
            a later run without it gathers the shards (see the module docstring).
    """
    from tqdm import tqdm

    from toolkit.tasks import build_task

    decoding = decoding or DecodingConfig(temperature=1.0)
    if (model is None) == (model_theta is None or model_t is None):
        raise GenerateConfigError("give either --model (plain) or both --model_theta and "
                                  "--model_t (q*)")
    options = {k: v for k, v in (("prompt_field", prompt_field),
                                 ("reference_field", reference_field)) if v}
    task = build_task(dataset, **options)
    examples = task.examples()[: num_samples or None]
    config = {"dataset": dataset, "model": model, "model_theta": model_theta,
              "model_t": model_t, "alpha_method": alpha_method if model is None else None,
              "fixed_alpha": fixed_alpha, "batch_size": batch_size,
              "decoding": asdict(decoding), "prompt_field": prompt_field, "dtype": dtype,
              "format": 2}  # 2: diagnostics carry log weights; older files are refused
    out_path = Path(output)
    shard_k, shard_n = _parse_shard(shard) if shard else (0, 1)
    in_output: set[int] = set()
    if shard:  # the output's own rows are done already; the shard makes the rest of its part
        if out_path.exists():  # read under its lock, then free it for the other shards
            with JsonlAppender(out_path, "sample_idx", config, lock_timeout_s=30) as main:
                in_output = main.done_keys()
        out_path = shard_path(out_path, shard_k, shard_n)
    writer = JsonlAppender(out_path, "sample_idx", config)
    done = writer.done_keys() | in_output
    diag_path = diagnostics_path(out_path)
    if diag_path.exists():  # keep only the samples the output holds (see module docstring)
        kept = [r for r in read_jsonl(diag_path) if r["sample_idx"] in done]
        atomic_write_text(diag_path, "".join(json.dumps(r) + "\n" for r in kept))
    diags = JsonlAppender(diag_path, "sample_idx") if model is None and save_diagnostics \
        else None
    if not shard:
        _absorb_shards(out_path, writer, diags, config, done)
    batches = [list(range(b, min(b + batch_size, len(examples))))
               for b in range(0, len(examples), batch_size)]
    todo = [b for j, b in enumerate(batches)
            if j % shard_n == shard_k and any(i not in done for i in b)]
    engine: Any = None  # loaded only when there is something to make
    if todo and model is not None:
        from toolkit.generation.hf_backend import TransformersBackend

        engine = TransformersBackend(model, dtype=dtype, device=device)
    elif todo:
        from toolkit.qstar.sampler import QStarSampler

        engine = QStarSampler(model_theta, model_t, alpha_method, fixed_alpha, dtype, device)
    bar = tqdm(total=sum(len(b) for b in todo), desc="generate", unit="sample", file=sys.stderr)
    t0, made = time.perf_counter(), 0
    for batch in todo:
        # The whole batch is regenerated (fixed by index) so its samples match an
        # uninterrupted run even if part of it was written before a kill.
        reqs = [GenerationRequest(examples[i].prompt, seed=i) for i in batch]
        outs = engine.generate(reqs, decoding, batch_size=batch_size)
        rows, drows = [], []
        for i, o in zip(batch, outs):
            if i in done:
                continue
            ex = examples[i]
            row = {"messages": [{"role": "user", "content": ex.prompt},
                                {"role": "assistant", "content": o.text}],
                   # OpenAI's names: "length" = cut at max_new_tokens, so SFT must not learn
                   # to end the turn there
                   "finish_reason": "length" if o.stop_reason == "length" else "stop",
                   "sample_idx": i, "original_id": ex.id}
            if ex.reference is not None:
                row["original_reference"] = ex.reference
            row.update({f"original_{k}": v for k, v in ex.meta.items()})
            rows.append(row)
            drows.append(_sample_diagnostics(i, o, sampled=not decoding.greedy))
        if diags is not None:
            diags.append(drows)
        writer.append(rows)
        done.update(batch)
        made += len(rows)
        bar.update(len(rows))
        bar.set_postfix(samples_per_min=f"{60 * made / (time.perf_counter() - t0):.1f}")
    bar.close()
    return {"output": str(out_path), "written": made, "total": len(done),
            "skipped_rows": len(task.skipped)}
