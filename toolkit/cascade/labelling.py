"""``python cli.py label``: run every stage of a cascade over a task and record everything.

One JSONL record per (prompt, stage), in ``<out_dir>/<task>/stage<i>-<slug>.jsonl``. A record
holds the answer, its ground-truth correctness, its agreement with the top stage's answer,
token counts, cost, timing, the exact decoding settings and model identity, and the per-token
arrays (token id, chosen log-prob, top-1 log-prob, full-distribution entropy, top-5) from which
every predictor feature is computed downstream, so this expensive run never has to be repeated
for a new feature.

Work goes in chunks of prompts, in prompt order. Inside a chunk the top stage runs first, so
lower stages can be scored against its answer as soon as they finish. Each stage's batch is
appended in one fsync'd write, so a SIGKILL loses at most the batch in flight, and a rerun
skips every record already written: each record ends up in the file exactly once.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.common.errors import UserError
from toolkit.common.io import JsonlAppender, atomic_write_json, atomic_write_text
from toolkit.common.splits import split_of
from toolkit.generation.base import DecodingConfig, GenerationRequest, call_cost

SCHEMA_VERSION = 1


@dataclass
class StageSpec:
    """One rung of the cascade ladder."""

    model: str
    """zoo:<slug>, a local transformers folder, or a hub id."""
    quantisation: str = "none"
    """none | nf4 (bitsandbytes 4-bit weights)."""
    dtype: str = "float32"
    """Weights dtype."""


@dataclass
class TaskSpec:
    """A benchmark task and its options (passed to toolkit.tasks.build_task)."""

    name: str
    """humaneval | gsm_symbolic | reasoning_gym | local | a path to .jsonl/.json/.parquet."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task options, e.g. {size: 200, seed: 42} for gsm_symbolic."""


def stage_file(out_dir: Path, task: str, index: int, slug: str) -> Path:
    return out_dir / task / f"stage{index}-{slug}.jsonl"


def _record(ex: Any, task: str, stage: int, backend: Any, out: Any, correct: Any,
            top_text: str, decoding: DecodingConfig, batch_id: int, batch_size: int,
            batch_wall: float, device: str) -> dict[str, Any]:
    from toolkit.tasks.agreement import bleu, chrf

    info = backend.info
    return {
        "schema_version": SCHEMA_VERSION,
        "id": ex.id, "task": task, "split": split_of(ex.id), "stage": stage,
        "model": info.slug, "model_sha256": info.sha256, "backend": info.backend,
        "quantisation": info.quantisation, "device": device,
        "prompt": ex.prompt, "reference": ex.reference, "output": out.text,
        "correct": correct,
        "agreement_bleu": bleu(out.text, top_text), "agreement_chrf": chrf(out.text, top_text),
        "prompt_tokens": out.prompt_tokens, "generated_tokens": out.generated_tokens,
        "stop_reason": out.stop_reason,
        "cost_flops": call_cost(info.non_embedding_params, out.prompt_tokens,
                                out.generated_tokens),
        "non_embedding_params": info.non_embedding_params,
        "decoding": asdict(decoding),
        "batch_id": batch_id, "batch_size": batch_size, "batch_wall_s": round(batch_wall, 4),
        "wall_s": round(out.wall_s, 4),
        "tokens": out.token_arrays(),
    }


def label(stages: list[StageSpec], tasks: list[TaskSpec],
          decoding: DecodingConfig | None = None, out_dir: str = "data/cascade",
          batch_size: int = 16, chunk_size: int = 48, limit: int | None = None,
          threads: int | None = None,
          device: str = "cpu", summarize_only: bool = False,
          card: str | None = None) -> dict[str, Any]:
    """Label prompts with every stage of a cascade (resumable; see the module docstring).

    Args:
        stages: the ladder, smallest first; the last stage is the verifier ("top").
        tasks: benchmark tasks whose prompts are labelled.
        decoding: decoding settings (greedy by default, as the live cascade and server use).
        out_dir: where the per-(task, stage) JSONL files go.
        batch_size: sequences decoding together (continuous batching: a finished answer's slot
            goes to the next prompt of the chunk at once).
        chunk_size: prompts per chunk; each stage runs a chunk in one call and appends its
            records in one write, so a kill loses at most one chunk of one stage.
        limit: label only the first N prompts of each task (0/None = all).
        threads: torch CPU threads (None = torch's default).
        device: cpu or cuda.
        summarize_only: print the accuracy/throughput table of existing records and stop.
        card: a data card (markdown) whose table between `<!-- table:begin -->` and
            `<!-- table:end -->` is rewritten from the records at the end.
    """
    from tqdm import tqdm

    from toolkit.generation.hf_backend import TransformersBackend
    from toolkit.models.loading import resolve
    from toolkit.tasks import build_task

    decoding = decoding or DecodingConfig()
    root = Path(out_dir)
    if len(stages) < 2:
        raise ValueError("a cascade needs at least 2 stages")
    if summarize_only:  # needs only the records, not the models
        table = summarize(root)
        print(table)
        if card:
            update_card(card, table)
        return {"table": table}
    slugs = [resolve(s.model).slug for s in stages]
    backends: dict[int, Any] = {}

    def backend(i: int) -> Any:
        if i not in backends:
            s = stages[i]
            backends[i] = TransformersBackend(s.model, s.quantisation, s.dtype, device, threads)
        return backends[i]

    top = len(stages) - 1
    report: dict[str, Any] = {"tasks": {}}
    built = [build_task(t.name, **t.options) for t in tasks]
    names = [b.name for b in built]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # one folder, two fingerprints: the records would mix and resuming would refuse
        raise UserError(f"label: two tasks write to {root / twice[0]}/; give one of them "
                        "another name (reasoning_gym: the task_name option)")
    jobs = [_TaskJob(b, t, stages, slugs, decoding, root, limit) for b, t in zip(built, tasks)]
    todo = sum(j.todo() for j in jobs)
    bar = tqdm(total=todo, desc="label", unit="rec", file=sys.stderr)
    # Chunks of the tasks take turns, so a run stopped early still covers every task.
    for chunks in itertools.zip_longest(*(j.chunks(chunk_size) for j in jobs)):
        for job, chunk in zip(jobs, chunks):
            if chunk is None:
                continue
            for i in range(top, -1, -1):  # top stage first: lower stages are scored against it
                bar.update(job.run_stage(i, chunk, backend(i), batch_size, device))
    bar.close()
    for job in jobs:
        job.finish()
        report["tasks"][job.task.name] = {"examples": len(job.examples),
                                          "skipped": len(job.skipped)}
    table = summarize(root)
    print(table)
    if card:
        update_card(card, table)
    report["table"] = table
    print(f"records written to {root.resolve()}/<task>/stage<k>-<model>.jsonl")
    return report


def update_card(card: str | Path, table: str) -> None:
    """Replace the table between the card's markers (atomically)."""
    text = Path(card).read_text()
    if "<!-- table:begin -->" not in text or "<!-- table:end -->" not in text:
        raise ValueError(f"{card} has no <!-- table:begin --> / <!-- table:end --> markers")
    head, rest = text.split("<!-- table:begin -->", 1)
    tail = rest.split("<!-- table:end -->", 1)[1]
    atomic_write_text(card, f"{head}<!-- table:begin -->\n{table}\n<!-- table:end -->{tail}")


class _TaskJob:
    """The labelling state of one task: its examples, output files and what is done."""

    def __init__(self, task: Any, spec: TaskSpec, stages: list[StageSpec], slugs: list[str],
                 decoding: DecodingConfig, root: Path, limit: int | None) -> None:
        self.task, self.decoding, self.root = task, decoding, root
        self.examples = task.examples()[: limit or None]
        self.skipped = [{"row": str(s.row), "reason": s.reason} for s in task.skipped]
        self.writers = []
        for i, s in enumerate(stages):
            config = {"schema_version": SCHEMA_VERSION, "task": asdict(spec), "stage": i,
                      "model": s.model, "slug": slugs[i], "quantisation": s.quantisation,
                      "dtype": s.dtype, "decoding": asdict(decoding)}
            self.writers.append(JsonlAppender(stage_file(root, task.name, i, slugs[i]), "id",
                                              config))
        self.top = len(stages) - 1
        self.done = [w.done_keys() for w in self.writers]
        self.top_text = {r["id"]: r["output"] for r in self.writers[self.top].rows()}
        self.next_batch = max((r["batch_id"] for w in self.writers for r in w.rows()),
                              default=-1) + 1

    def todo(self) -> int:
        return sum(len([e for e in self.examples if e.id not in d]) for d in self.done)

    def chunks(self, size: int) -> list[list[Any]]:
        return [self.examples[c:c + size] for c in range(0, len(self.examples), size)]

    def run_stage(self, i: int, chunk: list[Any], b: Any, batch_size: int, device: str) -> int:
        """Generate, score and append the chunk's missing records for stage i."""
        pending = [e for e in chunk if e.id not in self.done[i]]
        if not pending:
            return 0
        budget = self.decoding.max_new_tokens
        fits = [e for e in pending
                if b.count_tokens(e.prompt, self.decoding) + budget <= b.context_length]
        self.skipped += [{"row": e.id, "reason": f"prompt too long for stage {i}"}
                         for e in pending if e not in fits]
        if not fits:
            return 0
        t0 = time.perf_counter()
        outs = b.generate([GenerationRequest(e.prompt) for e in fits], self.decoding,
                          batch_size=batch_size)
        wall = time.perf_counter() - t0
        scores = self.task.score_many(fits, [o.text for o in outs])
        if i == self.top:
            self.top_text.update({e.id: o.text for e, o in zip(fits, outs)})
        rows = [_record(e, self.task.name, i, b, o, sc, self.top_text.get(e.id, ""),
                        self.decoding, self.next_batch, batch_size, wall, device)
                for e, o, sc in zip(fits, outs, scores)]
        self.next_batch += 1
        self.writers[i].append(rows)
        self.done[i].update(e.id for e in fits)
        return len(fits)

    def finish(self) -> None:
        path = self.root / self.task.name / "skipped.json"
        if self.skipped:
            print(f"label: {len(self.skipped)} bad or skipped row(s) in {self.task.name} "
                  f"(listed in {path})", file=sys.stderr)
        atomic_write_json(path, self.skipped)


def load_records(root: str | Path) -> list[dict[str, Any]]:
    """Every record under a label directory (all tasks, all stages); a file holding a prompt
    twice (two writers at once, before outputs were locked) is refused, never counted twice."""
    from toolkit.common.io import read_jsonl_unique

    rows: list[dict[str, Any]] = []
    for path in sorted(Path(root).glob("*/stage*.jsonl")):
        rows.extend(read_jsonl_unique(path, "id"))
    return rows


def summarize(root: str | Path) -> str:
    """Markdown table: per task and stage, n, accuracy, agreement, tokens and tokens/s."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in load_records(root):
        groups[(r["task"], r["stage"])].append(r)
    lines = ["| task | stage | model | n | accuracy | BLEU>0.8 w/ top | mean gen tokens "
             "| tokens/s | CPU-min |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, stage), rows in sorted(groups.items()):
        scored = [r["correct"] for r in rows if r["correct"] is not None]
        acc = f"{100 * sum(scored) / len(scored):.1f}%" if scored else "n/a"
        agree = sum(r["agreement_bleu"] > 0.8 for r in rows) / len(rows)
        batches = {r["batch_id"]: r["batch_wall_s"] for r in rows}
        wall = sum(batches.values())
        gen = sum(r["generated_tokens"] for r in rows)
        lines.append(f"| {task} | {stage} | {rows[0]['model']} | {len(rows)} | {acc} | "
                     f"{100 * agree:.1f}% | {gen / len(rows):.0f} | {gen / max(wall, 1e-9):.1f} "
                     f"| {wall / 60:.1f} |")
    return "\n".join(lines)
