"""probe-v1 features (toolkit/cascade/probe_features.py) on real records of tiny random models.

The records come from ``label`` itself (two tiny stages, a local task), so the answer tokens
are exactly what a stage generated. Checked against an independent formulation: transformers
run directly on each record's prompt ids (chat template applied here) + answer ids, with the
answer positions averaged by hand; and against the parameter count of the module tree (FLOPs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.cascade.probe_features import (
    PROBE_SCHEMA,
    ProbeSidecarError,
    build_probe_sidecar,
    load_probe,
    sidecar_paths,
    stage_records,
)
from toolkit.common.io import read_jsonl
from toolkit.generation.base import UnservableSchemaError, check_feature_schema

N_PROMPTS = 7
SYSTEM = "Be brief."


@pytest.fixture(scope="module")
def records(tmp_path_factory, tiny_lm, tiny_lm_b) -> Path:
    """Labelled records of a two-stage tiny cascade (with a system prompt)."""
    from toolkit.cascade.labelling import StageSpec, TaskSpec, label
    from toolkit.generation.base import DecodingConfig

    root = tmp_path_factory.mktemp("probe")
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(N_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i} + {3 * i}? " * (1 + i % 3),
                                "answer": str(4 * i)}) + "\n")
    label([StageSpec(str(tiny_lm)), StageSpec(str(tiny_lm_b))], [TaskSpec(str(prompts))],
          DecodingConfig(max_new_tokens=10, system_prompt=SYSTEM), str(root / "out"),
          batch_size=4, threads=1)
    return root / "out"


def _copy(records: Path, dest: Path, keep: int | None = None) -> Path:
    """A records folder with the first ``keep`` stage-0 records (all stages' files)."""
    for src in records.glob("*/stage*"):
        out = dest / src.parent.name / src.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.name.endswith(".jsonl") and keep is not None:
            out.write_text("".join(json.dumps(r) + "\n" for r in list(read_jsonl(src))[:keep]))
        else:
            out.write_bytes(src.read_bytes())
    return dest


def _naive(lm_dir: Path, rec: dict, layers: list[int]) -> tuple[np.ndarray, int]:
    """One record alone: chat template by hand, full causal LM on prompt + answer ids, mean of
    the hidden states at the answer positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": rec["prompt"]}],
                                   tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    answer = rec["tokens"]["token_ids"]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        states = lm(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(prompt)
    return torch.cat([states[k][0, n:].mean(0) for k in layers]).numpy(), n + len(answer)


def test_probe_equals_a_direct_forward_over_prompt_and_answer(records, tiny_lm, tmp_path):
    data = _copy(records, tmp_path / "d")
    npz = build_probe_sidecar(str(data), 0, layers=[-1, 1], batch_size=3)
    assert npz == sidecar_paths(data, 0, tiny_lm.name)[0]
    with np.load(npz) as z:
        assert z["emb"].dtype == np.float16 and len(z["ids"]) == N_PROMPTS
    recs = list(read_jsonl(next(data.glob("*/stage0-*.jsonl"))))
    ids = [r["id"] for r in recs]
    x, flops, meta = load_probe(data, 0, ids)
    assert meta["schema"] == PROBE_SCHEMA and meta["layers"] == [2, 1] and meta["dim"] == 64
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm)
    non_emb = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    lengths = set()
    for i, rec in enumerate(recs):
        want, n_tokens = _naive(tiny_lm, rec, [-1, 1])
        np.testing.assert_allclose(x[i], want, rtol=2e-3, atol=2e-3)  # float16 storage
        assert flops[i] == 2 * non_emb * n_tokens == rec["cost_flops"]
        lengths.add(n_tokens)
    assert len(lengths) > 1  # batches were padded: the check above covers padding
    # Pooling the answer differs from pooling the prompt (the probe reads the answer).
    from toolkit.cascade.prompt_embeddings import PromptEmbedder

    emb, _ = PromptEmbedder(str(tiny_lm), (-1, 1)).embed([recs[0]["prompt"]])
    assert np.abs(emb[0] - x[0]).max() > 1e-2


def test_resume_computes_only_the_missing_ids(records, tmp_path, capsys):
    data = _copy(records, tmp_path / "d", keep=3)
    npz = build_probe_sidecar(str(data), 0, batch_size=2)
    with np.load(npz) as z:
        first = dict(zip(z["ids"], z["emb"]))
    assert len(first) == 3
    _copy(records, data)  # the rest of the records arrive
    capsys.readouterr()
    build_probe_sidecar(str(data), 0, batch_size=2)
    out = capsys.readouterr().out
    assert f"3/{N_PROMPTS} records already" in out
    # Only the 4 missing records were computed: two batches of two, then nothing more.
    assert f"5/{N_PROMPTS} records" in out and f"{N_PROMPTS}/{N_PROMPTS} records" in out
    progress = [ln for ln in out.splitlines() if ln.startswith("probe: ") and " s)" in ln]
    assert len(progress) == 2
    with np.load(npz) as z:
        again = dict(zip(z["ids"], z["emb"]))
    assert len(again) == N_PROMPTS and all(np.array_equal(again[i], first[i]) for i in first)
    full = _copy(records, tmp_path / "full")
    build_probe_sidecar(str(full), 0, batch_size=N_PROMPTS)
    ids = sorted(again)
    a, fa, _ = load_probe(data, 0, ids)
    b, fb, _ = load_probe(full, 0, ids)
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(fa, fb)


def _one_line(err: Exception) -> str:
    assert "\n" not in str(err)
    return str(err)


def test_missing_stale_and_incomplete_sidecars_are_refused(records, tiny_lm, tmp_path):
    data = _copy(records, tmp_path / "d", keep=4)
    ids = [r["id"] for r in list(read_jsonl(next(data.glob("*/stage0-*.jsonl"))))]
    make = f"`python cli.py probe --data_dir {data} --stage 0`"
    with pytest.raises(ProbeSidecarError) as e:
        load_probe(data, 0, ids)
    assert "no probe-v1 features of stage 0" in _one_line(e.value) and make in str(e.value)

    build_probe_sidecar(str(data), 0)
    sha = json.loads(sidecar_paths(data, 0, tiny_lm.name)[1].read_text())["sha256"]
    load_probe(data, 0, ids, sha256=sha, layers=[-1, 1])
    with pytest.raises(ProbeSidecarError) as e:
        load_probe(data, 0, ids, sha256="0" * 64)
    assert "another sha256" in _one_line(e.value) and "--force true" in str(e.value)
    with pytest.raises(ProbeSidecarError) as e:
        load_probe(data, 0, ids, layers=[0])
    assert "another layers" in _one_line(e.value)
    with pytest.raises(ProbeSidecarError) as e:
        build_probe_sidecar(str(data), 0, layers=[0])
    assert "another layers" in _one_line(e.value) and "--force true" in str(e.value)

    all_ids = [r["id"] for r in list(read_jsonl(next(records.glob("*/stage0-*.jsonl"))))]
    with pytest.raises(ProbeSidecarError) as e:
        load_probe(data, 0, all_ids)
    assert f"{N_PROMPTS - 4} of {N_PROMPTS} record ids" in _one_line(e.value)
    assert make in str(e.value)


def test_records_of_other_weights_or_mixed_schema_are_refused(records, tiny_lm_b, tmp_path):
    data = _copy(records, tmp_path / "d")
    with pytest.raises(ProbeSidecarError) as e:  # stage 0 was written by tiny_lm, not tiny_lm_b
        build_probe_sidecar(str(data), 0, model=str(tiny_lm_b))
    assert "model that wrote them" in _one_line(e.value)
    path = next(data.glob("*/stage1-*.jsonl"))
    rows = list(read_jsonl(path))
    rows[0]["schema_version"] = 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ProbeSidecarError) as e:
        stage_records(data, 1)
    assert "mix schema versions" in _one_line(e.value)
    assert stage_records(data, 0).slug == records.glob("*/stage0-*.jsonl").__next__().name[7:-6]


def test_backends_declare_the_schemas_they_serve():
    from toolkit.generation.hf_backend import TransformersBackend
    from toolkit.generation.vllm_backend import VLLMBackend

    for schema in ("topk-v1", "full-v1", PROBE_SCHEMA):
        check_feature_schema(TransformersBackend, schema)
    check_feature_schema(VLLMBackend, "topk-v1")
    for schema in (PROBE_SCHEMA, "full-v1"):
        with pytest.raises(UnservableSchemaError) as e:
            check_feature_schema(VLLMBackend, schema)
        assert "vllm" in _one_line(e.value) and "fall back to topk-v1" in str(e.value)
