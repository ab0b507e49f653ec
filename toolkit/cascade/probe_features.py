"""Post-draft probe features (``probe-v1``): a stage model's own hidden states over its answer.

``topk-v1`` sees only the log-probs a stage returned with its answer. A probe looks inside:
one extra forward of the stage's own model over the chat-formatted prompt followed by the
answer tokens exactly as the stage generated them (same tokenizer, chat template and system
prompt, through :class:`TransformersBackend`, the path the prompt embeddings take), and the
mean over the ANSWER positions of the hidden states of chosen layers (default: the last and the
middle one, counted as in :mod:`toolkit.cascade.prompt_embeddings`), concatenated. The forward
is a model call and is charged like one (SPEC §D2: ``2 · non-embedding params · (prompt +
answer tokens)``), per record.

Only backends that expose hidden states can serve this schema: transformers can, vLLM cannot
(``feature_schemas`` of each backend; ``generation.base.check_feature_schema``).

Sidecar, one per stage, beside the records: ``<data_dir>/probe_features/stage<k>-<slug>.npz``
(record ids, float16 features, FLOPs per record) and ``.json`` (schema, stage, model sha256,
layers, pooling, chat formatting). ``python cli.py probe --data_dir D --stage K`` makes it,
resumably; :func:`load_probe` reads it and refuses a missing, stale or incomplete one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.hidden_sidecar import (
    HiddenStateReader,
    Sidecar,
    SidecarError,
    resolve_layers,
)
from toolkit.generation.base import DecodingConfig, call_cost

PROBE_SCHEMA = "probe-v1"
SIDECAR_DIR = "probe_features"
POOLING = "mean of hidden states over the answer tokens (as generated), layers concatenated"
# What makes a probe sidecar what it is: another value of any of these is a stale sidecar.
BUILD_KEYS = ("schema", "stage", "sha256", "layers", "chat_template", "system_prompt",
              "pooling")


class ProbeSidecarError(SidecarError):
    """A probe-feature sidecar or its records are missing, stale or inconsistent (one line)."""


def _make_command(data_dir: str | Path, stage: int, model: str | None = None,
                  force: bool = False) -> str:
    return (f"`python cli.py probe --data_dir {data_dir} --stage {stage}"
            f"{f' --model {model}' if model else ''}{' --force true' if force else ''}`")


def sidecar_paths(data_dir: str | Path, stage: int, slug: str) -> tuple[Path, Path]:
    """(npz, json meta) of stage ``stage``'s probe sidecar (model ``slug``)."""
    folder = Path(data_dir) / SIDECAR_DIR
    return folder / f"stage{stage}-{slug}.npz", folder / f"stage{stage}-{slug}.json"


def _sidecar(data_dir: str | Path, stage: int, slug: str, model: str | None) -> Sidecar:
    npz, meta = sidecar_paths(data_dir, stage, slug)
    return Sidecar(npz, meta, f"{PROBE_SCHEMA} features of stage {stage}", "record ids",
                   lambda _, force: _make_command(data_dir, stage, model, force),
                   ProbeSidecarError)


@dataclass
class StageRecords:
    """What the probe needs of one stage's labelled records (all tasks), in id order."""

    stage: int
    model: str  # the name ``label`` loaded the stage with (its meta), else zoo:<slug>
    slug: str
    sha256: str | None
    formatting: dict[str, Any]  # chat_template, system_prompt
    ids: list[str]
    prompts: list[Any]
    prompt_tokens: list[int]
    answers: list[list[int]]  # the generated token ids, exactly as recorded


def stage_files(data_dir: str | Path, stage: int) -> list[Path]:
    """The record files of stage ``stage`` (one per task); refuses a stage without any."""
    from toolkit.cascade.prompt_table import record_files

    files = [p for p in record_files(data_dir) if p.name.startswith(f"stage{stage}-")]
    if not files:
        raise ProbeSidecarError(f"no stage-{stage} records under {data_dir}; make them with "
                                "`python cli.py label`")
    return files


def stage_rows(data_dir: str | Path, stage: int) -> list[dict[str, Any]]:
    """Every record of stage ``stage`` (all tasks), sorted by id."""
    from toolkit.common.io import read_jsonl_unique

    return sorted((r for p in stage_files(data_dir, stage) for r in read_jsonl_unique(p, "id")),
                  key=lambda r: r["id"])


def stage_records(data_dir: str | Path, stage: int) -> StageRecords:
    """Stage ``stage``'s records under ``data_dir``; refuses a stage without records and one
    whose records mix schema versions, models or chat formattings."""
    files = stage_files(data_dir, stage)
    rows = stage_rows(data_dir, stage)
    names = set()
    for p in files:
        meta = Path(f"{p}.meta.json")
        names.add(json.loads(meta.read_text())["config"]["model"] if meta.is_file() else None)
    seen: dict[str, set[str]] = {}
    for r in rows:
        d = r.get("decoding", {})
        for key, value in (("schema version", r.get("schema_version")), ("stage", r["stage"]),
                           ("model", r["model"]), ("model sha256", r.get("model_sha256")),
                           ("chat formatting", (d.get("chat_template", True),
                                                d.get("system_prompt")))):
            seen.setdefault(key, set()).add(json.dumps(value))
    for key, values in seen.items():
        if len(values) > 1:
            raise ProbeSidecarError(f"stage-{stage} records under {data_dir} mix {key}s "
                                    f"({', '.join(sorted(values))}); relabel them with one")
    slug = rows[0]["model"]
    names.discard(None)
    chat_template, system_prompt = json.loads(seen["chat formatting"].pop())
    return StageRecords(
        stage, names.pop() if len(names) == 1 else f"zoo:{slug}", slug, rows[0].get("model_sha256"),
        {"chat_template": chat_template, "system_prompt": system_prompt},
        [r["id"] for r in rows], [r["prompt"] for r in rows],
        [int(r["prompt_tokens"]) for r in rows],
        [[int(t) for t in r["tokens"]["token_ids"]] for r in rows])


class ProbeFeaturizer(HiddenStateReader):
    """``probe-v1`` features of answers: one forward over prompt + answer, answer positions
    mean-pooled (args and attributes: :class:`HiddenStateReader`)."""

    error = ProbeSidecarError

    def features_ids(self, prompts: list[list[int]], answers: list[list[int]]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Features float32 [N, dim] and the forward's FLOPs [N] from token ids."""
        if any(not a for a in answers):
            raise ProbeSidecarError("an answer has no tokens: nothing to pool for probe-v1")
        x = self.pool([p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts])
        flops = np.array([call_cost(self.non_embedding_params, len(p), len(a))
                          for p, a in zip(prompts, answers)])
        return x, flops


def build_probe_sidecar(data_dir: str = "data/cascade", stage: int = 0,
                        model: str | None = None, layers: list[int] | None = None,
                        batch_size: int = 8, force: bool = False) -> Path:
    """Probe every stage-``stage`` record not yet in the sidecar; return its npz.

    The model is the one the records name (``label``'s model name); ``model`` overrides the
    name but must have the records' sha256: a probe of other weights would describe answers
    that model did not write. Each record's prompt must tokenise to its recorded
    ``prompt_tokens``, else the formatting differs from labelling and is refused.
    """
    from toolkit.models.loading import resolve

    recs = stage_records(data_dir, stage)
    name = model or recs.model
    resolved = resolve(name)
    if recs.sha256 is not None and resolved.sha256 != recs.sha256:
        raise ProbeSidecarError(
            f"stage-{stage} records were written by {recs.slug} sha256 {recs.sha256[:12]}, but "
            f"{name} is {resolved.slug} sha256 {str(resolved.sha256)[:12]}; probe them with the "
            "model that wrote them (--model)")
    sidecar = _sidecar(data_dir, stage, resolved.slug, model)
    want = {"schema": PROBE_SCHEMA, "stage": stage, "sha256": resolved.sha256,
            "pooling": POOLING, **recs.formatting}
    if not force and sidecar.npz.exists():  # before loading the model: resolving is cheap
        sidecar.check_meta(want, BUILD_KEYS)
    probe = ProbeFeaturizer(name, layers, DecodingConfig(**recs.formatting))
    n_states = int(probe.backend.model.config.num_hidden_layers) + 1
    meta = {**want, "model": name, "slug": probe.slug, "layers": list(probe.layers),
            "hidden_states": n_states, "dim": probe.dim,
            "non_embedding_params": probe.non_embedding_params,
            "flops": "2 * non_embedding_params * (prompt + answer tokens) (SPEC D2), per record",
            "storage": "float16"}
    row = {i: k for k, i in enumerate(recs.ids)}
    prompt_len: dict[str, int] = {}

    def tokenise(todo: list[str]) -> list[list[int]]:
        prompts = probe.token_ids([recs.prompts[row[i]] for i in todo])
        for i, p in zip(todo, prompts):
            if len(p) != recs.prompt_tokens[row[i]]:
                raise ProbeSidecarError(
                    f"record {i} (stage {stage}): its prompt tokenises to {len(p)} tokens, the "
                    f"record says {recs.prompt_tokens[row[i]]}; the model or chat formatting "
                    "is not the one that labelled it")
            prompt_len[i] = len(p)
        return [p + recs.answers[row[i]] for i, p in zip(todo, prompts)]

    def compute(ids: list[str], tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return probe.features_ids([t[:prompt_len[i]] for i, t in zip(ids, tokens)],
                                  [t[prompt_len[i]:] for i, t in zip(ids, tokens)])

    return sidecar.build(meta, recs.ids, BUILD_KEYS, tokenise, compute, batch_size, force,
                         "probe", "records")


def load_probe(data_dir: str | Path, stage: int, ids: list[str] | np.ndarray,
               slug: str | None = None, sha256: str | None = None,
               layers: list[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``probe-v1`` features float32 [len(ids), D] and FLOPs [len(ids)] of stage ``stage``'s
    records ``ids``, and the sidecar's meta.

    ``slug``: the stage's model (default: the one sidecar of the stage); ``sha256`` and
    ``layers`` (any ``hidden_states`` indices; None: whatever the sidecar holds), when given,
    must be the sidecar's.

    Raises:
        ProbeSidecarError: no sidecar; one made with other weights or layers; or ids it lacks.
    """
    folder = Path(data_dir) / SIDECAR_DIR
    if slug is None:
        found = sorted(folder.glob(f"stage{stage}-*.npz"))
        if len(found) > 1:
            raise ProbeSidecarError(f"{len(found)} probe sidecars of stage {stage} in {folder} "
                                    f"({', '.join(p.name for p in found)}); name the model slug")
        slug = found[0].stem.split("-", 1)[1] if found else "*"
    sidecar = _sidecar(data_dir, stage, slug, None)
    want: dict[str, Any] = {"schema": PROBE_SCHEMA, "stage": stage}
    if sha256 is not None:
        want["sha256"] = sha256
    meta = sidecar.read_meta()
    if layers is not None and meta is not None:
        want["layers"] = list(resolve_layers(layers, int(meta["hidden_states"]),
                                             ProbeSidecarError))
    return sidecar.load([str(i) for i in ids], want, BUILD_KEYS)


# ------------------------------------------------------------------------------- CLI
def probe(data_dir: str = "data/cascade", stage: int = 0, model: str | None = None,
          layers: list[int] | None = None, batch_size: int = 8, force: bool = False) -> str:
    """Compute probe-v1 features of every labelled answer of one stage into a sidecar.

    One extra forward of the stage's own model over prompt + answer (as generated) per record;
    the mean over the answer tokens of the chosen layers' hidden states, concatenated. Writes
    <data_dir>/probe_features/stage<K>-<slug>.npz (record ids, float16 features, FLOPs per
    record) and .json (schema, model sha256, layers, pooling, chat formatting). Resumable: a
    rerun computes only the records not yet there.

    Args:
        data_dir: the labelled records (output folder of `label`).
        stage: the stage whose answers are probed (its records' model is loaded).
        model: zoo:<slug> or a local folder with the records' weights (default: the model the
            records were labelled with).
        layers: hidden_states indices to pool (0 = token embeddings, -1 = last); default:
            the last and the middle layer.
        batch_size: records per padded forward.
        force: rebuild a sidecar made with other weights, layers or chat formatting.
    """
    path = build_probe_sidecar(data_dir, stage, model, layers, batch_size, force)
    print(f"probe: wrote {path}")
    return str(path)
