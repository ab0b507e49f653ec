"""The predictor module's router heads and prompt-reading post-draft heads, and their ONNX file.

Checked against independent formulations: the router heads must recover which stage answers
which prompt on synthetic data where that is a known function of the embedding (a mix-up of
rows and stages in the loss cannot pass), and the exported file (standardisation folded into
the weights) must equal the unfolded torch module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from toolkit.cascade.features import CascadeInputError
from toolkit.cascade.onnx_export import export_onnx
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.predictor_module import (
    QualityPredictor,
    predict_correct,
    predict_route,
    train_quality_predictor,
)

F, D, L = 23, 40, 3


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, ...]:
    """n prompts x L stages. Stage 0 is right iff e[0] > 0, stage 1 iff e[1] > 0, stage 2
    always; the draft features carry noise only (plus the stage one-hot)."""
    rng = np.random.default_rng(seed)
    emb = (rng.normal(size=(n, D)) * rng.uniform(0.5, 5, D) + rng.normal(size=D) * 3
           ).astype(np.float32)
    correct = np.stack([emb[:, 0] > 0, emb[:, 1] > 0, np.ones(n, bool)], 1).astype(np.float32)
    feats = rng.normal(size=(n, L, F)).astype(np.float32)
    feats[:, :, :L] = np.eye(L, dtype=np.float32)
    agree = np.full((n, L), np.nan, np.float32)
    agree[:, :-1] = correct[:, :-1]
    targets = np.stack([correct, agree], -1)
    return emb, correct, feats, targets


def _rows(emb: np.ndarray, feats: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    n = len(emb)
    return {"features": feats.reshape(-1, F), "targets": targets.reshape(-1, 2),
            "embeddings": np.repeat(emb, L, 0), "stages": np.tile(np.arange(L), n)}


def test_router_heads_learn_which_stage_answers_which_prompt():
    emb, correct, feats, targets = _synthetic(400, 0)
    rows = _rows(emb, feats, targets)
    model = train_quality_predictor(rows["features"], rows["targets"], "topk", L, steps=300,
                                    embeddings=rows["embeddings"], stages=rows["stages"],
                                    router_l2=0.0, hidden=[16])
    emb_t, correct_t, feats_t, _ = _synthetic(200, 1)
    R = predict_route(model, emb_t)
    assert R.shape == (200, L)
    assert roc_auc_score(correct_t[:, 0], R[:, 0]) > 0.95
    assert roc_auc_score(correct_t[:, 1], R[:, 1]) > 0.95
    # Swapped heads would rank the other stage's prompts: near chance.
    assert abs(roc_auc_score(correct_t[:, 0], R[:, 1]) - 0.5) < 0.15
    assert R[:, 2].mean() > 0.95  # the always-right stage
    # The post-draft heads read the prompt too: they also find it (the features are noise).
    P = predict_correct(model, feats_t, emb_t)
    assert P.shape == (200, L) and roc_auc_score(correct_t[:, 0], P[:, 0]) > 0.85


def test_draft_only_predictor_cannot_route():
    emb, _, feats, targets = _synthetic(50, 0)
    model = train_quality_predictor(feats.reshape(-1, F), targets.reshape(-1, 2), "topk", L,
                                    steps=5)
    assert not model.reads_prompt
    with pytest.raises(CascadeInputError, match="no router heads"):
        model.route(torch.from_numpy(emb))
    with pytest.raises(CascadeInputError, match="projection_dim"):
        QualityPredictor(embedding_dim=D, projection_dim=128)


@pytest.mark.parametrize("draft_reads_prompt", [True, False])
def test_onnx_file_equals_the_unfolded_module(tmp_path, draft_reads_prompt):
    emb, _, feats, targets = _synthetic(120, 2)
    rows = _rows(emb, feats, targets)
    rows["features"][:, L + 2] = 1.0  # a constant input: its std is clamped to 1e-6
    model = train_quality_predictor(rows["features"], rows["targets"], "topk", L, steps=30,
                                    embeddings=rows["embeddings"], stages=rows["stages"],
                                    draft_reads_prompt=draft_reads_prompt)
    model.embedding_spec = {"slug": "synthetic", "dim": D}
    path = export_onnx(model, tmp_path / "predictor.onnx")
    rt = OnnxQualityPredictor(path)
    assert rt.reads_prompt and rt.embedding == {"slug": "synthetic", "dim": D}
    with torch.no_grad():
        x, e = torch.from_numpy(rows["features"]), torch.from_numpy(rows["embeddings"])
        want_p, want_r = model(x, e).numpy(), model.route(e).numpy()
    assert np.abs(rt.predict(rows["features"], embedding=rows["embeddings"]) - want_p).max() < 1e-5
    assert np.abs(rt.route(rows["embeddings"]) - want_r).max() < 1e-5
    # One embedding row serves a batch of draft rows (the stages of one prompt).
    one = rt.predict(feats[0], embedding=emb[0])
    assert np.abs(one - want_p[:L]).max() < 1e-5
