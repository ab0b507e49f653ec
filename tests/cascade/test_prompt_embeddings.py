"""Prompt embeddings (toolkit/cascade/prompt_embeddings.py) on tiny random models.

Checked against independent formulations: each prompt's own unpadded forward through the full
causal LM (padding and masking), the tokenizer's chat template applied here (formatting), the
parameter count taken from the module tree (FLOPs), and one full build (resumability).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from toolkit.cascade.prompt_embeddings import (
    EmbeddingSidecarError,
    PromptEmbedder,
    build_sidecar,
    load_sidecar,
    sidecar_paths,
)
from toolkit.generation.base import DecodingConfig

PROMPTS = ["Add 2 and 3.", "There are 12 students playing basketball and twice that number "
           "playing volleyball. How many students?", "def add(a, b):", "Name three colors: red,"
           " green, blue. Write a haiku about the sea.", "7"]


@pytest.fixture(scope="module")
def embedder(tiny_lm):
    return PromptEmbedder(str(tiny_lm), layers=(-1, 1, 0),
                          decoding=DecodingConfig(system_prompt="Be brief."))


def _naive(lm_dir: Path, prompt: str, system: str | None, layers: list[int]
           ) -> tuple[np.ndarray, int]:
    """One prompt alone: chat template by hand, full causal LM, mean of hidden states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = lm(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.cat([states[k][0].mean(0) for k in layers]).numpy(), ids.shape[1]


def test_pooled_embedding_equals_each_prompts_own_unpadded_forward(embedder, tiny_lm):
    emb, flops = embedder.embed(PROMPTS)
    assert emb.dtype == np.float32 and emb.shape == (len(PROMPTS), embedder.dim)
    assert embedder.layers == (2, 1, 0) and embedder.dim == 3 * 32
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm)
    # Non-embedding parameters from the module tree: everything but the token-embedding table.
    non_emb = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    for i, prompt in enumerate(PROMPTS):
        want, n_tokens = _naive(tiny_lm, prompt, "Be brief.", [-1, 1, 0])
        np.testing.assert_allclose(emb[i], want, rtol=1e-4, atol=1e-5)
        assert flops[i] == 2 * non_emb * n_tokens
    # The prompts differ in length, so the batch was padded (the check above covers padding).
    assert len({len(t) for t in embedder.token_ids(PROMPTS)}) == len(PROMPTS)


def _write_records(data_dir: Path, ids: list[str], system: str | None = None) -> None:
    """Stage-0 and stage-1 records (stage 1 with another prompt text: it must be ignored)."""
    for task in ("taska", "taskb"):
        mine = [i for i in ids if i.startswith(task)]
        (data_dir / task).mkdir(parents=True, exist_ok=True)
        for stage in (0, 1):
            with open(data_dir / task / f"stage{stage}-m{stage}.jsonl", "w") as f:
                for i in mine:
                    n = int(i.split("/")[1])
                    prompt = PROMPTS[n % len(PROMPTS)] + f" ({n})" if stage == 0 else "other"
                    f.write(json.dumps({"id": i, "stage": stage, "prompt": prompt, "decoding": {
                        "chat_template": True, "system_prompt": system}}) + "\n")


ALL_IDS = [f"taska/{n}" for n in range(0, 10, 2)] + [f"taskb/{n}" for n in range(1, 10, 2)]


def test_resumed_build_equals_one_full_build(tmp_path, tiny_lm, capsys):
    half, full = tmp_path / "half", tmp_path / "full"
    _write_records(half, ALL_IDS[:3] + ALL_IDS[5:7])
    npz = build_sidecar(str(half), str(tiny_lm), batch_size=2)
    with np.load(npz) as z:
        assert sorted(z["ids"]) == sorted(ALL_IDS[:3] + ALL_IDS[5:7])
        assert z["emb"].dtype == np.float16 and z["flops"].dtype == np.float64
    _write_records(half, ALL_IDS)
    capsys.readouterr()
    build_sidecar(str(half), str(tiny_lm), batch_size=2)
    assert "5/10 prompts already" in capsys.readouterr().out
    _write_records(full, ALL_IDS)
    build_sidecar(str(full), str(tiny_lm), batch_size=3)

    slug = tiny_lm.name
    e1, f1, m1 = load_sidecar(half, ALL_IDS, slug)
    e2, f2, m2 = load_sidecar(full, ALL_IDS[::-1], slug)
    assert e1.dtype == np.float32 and e1.shape == (10, m1["dim"])
    np.testing.assert_allclose(e1, e2[::-1], rtol=2e-3, atol=1e-3)  # float16, other batches
    np.testing.assert_array_equal(f1, f2[::-1])
    assert m1 == m2 and m1["layers"] == [2, 1] and m1["chat_template"] is True
    # Stage-0 prompts were embedded, formatted as the stage model reads them.
    emb, _ = PromptEmbedder(str(tiny_lm)).embed([PROMPTS[3] + " (3)"])
    np.testing.assert_allclose(e1[ALL_IDS.index("taskb/3")], emb[0], rtol=2e-3, atol=1e-3)


def _one_line(err: Exception) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def test_load_errors_are_one_line_and_name_the_command(tmp_path, tiny_lm):
    data = tmp_path / "d"
    _write_records(data, ALL_IDS[:4])
    slug = tiny_lm.name
    with pytest.raises(EmbeddingSidecarError) as e:
        load_sidecar(data, ALL_IDS[:4], slug)
    assert "no prompt embeddings" in _one_line(e.value)
    assert f"`python cli.py embed --data_dir {data} --model zoo:{slug}`" in str(e.value)

    build_sidecar(str(data), str(tiny_lm), batch_size=4)
    _, _, meta = load_sidecar(data, ALL_IDS[:4], slug, sha256=None)
    load_sidecar(data, ALL_IDS[:4], slug, sha256=meta["sha256"])
    with pytest.raises(EmbeddingSidecarError) as e:
        load_sidecar(data, ALL_IDS[:4], slug, sha256="0" * 64)
    assert "sha256" in _one_line(e.value) and "--force true" in str(e.value)
    assert f"python cli.py embed --data_dir {data}" in str(e.value)
    with pytest.raises(EmbeddingSidecarError) as e:
        load_sidecar(data, ALL_IDS, slug)
    assert "6 of 10 prompt ids" in _one_line(e.value)
    assert f"`python cli.py embed --data_dir {data} --model {tiny_lm}`" in str(e.value)


def test_stale_sidecar_is_refused_through_the_cli_unless_forced(tmp_path, tiny_lm):
    from toolkit.models.tiny import make_tiny_causal_lm

    data = tmp_path / "d"
    _write_records(data, ALL_IDS[:4])
    build_sidecar(str(data), str(tiny_lm), batch_size=4)
    # Same slug (folder name), other weights: another sha256.
    other = make_tiny_causal_lm(tmp_path / "other" / tiny_lm.name, seed=7)

    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "cli.py", "embed", "--data_dir", str(data),
                               "--model", str(other), *extra], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    proc = cli()
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "sha256" in lines[0]
    assert "--force true" in lines[0]
    # Refused means untouched: the old embeddings still load under their own sha256.
    old = json.loads(sidecar_paths(data, tiny_lm.name)[1].read_text())["sha256"]
    load_sidecar(data, ALL_IDS[:4], tiny_lm.name, sha256=old)

    proc = cli("--force", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4/4 prompts" in proc.stdout and "wrote" in proc.stdout
    new = json.loads(sidecar_paths(data, tiny_lm.name)[1].read_text())["sha256"]
    assert new != old
    load_sidecar(data, ALL_IDS[:4], tiny_lm.name, sha256=new)


def test_other_layers_are_refused(tmp_path, tiny_lm):
    data = tmp_path / "d"
    _write_records(data, ALL_IDS[:2])
    build_sidecar(str(data), str(tiny_lm), layers=[-1], batch_size=4)
    build_sidecar(str(data), str(tiny_lm), layers=[2], batch_size=4)  # the same layer
    with pytest.raises(EmbeddingSidecarError, match="layers"):
        build_sidecar(str(data), str(tiny_lm), layers=[1], batch_size=4)
    with pytest.raises(EmbeddingSidecarError, match="out of range"):
        PromptEmbedder(str(tiny_lm), layers=(3,))
