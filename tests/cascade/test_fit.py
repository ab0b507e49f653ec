"""`python cli.py fit` for real on the shipped records: checkpoint, ONNX, TensorBoard, config."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    proc = subprocess.run([sys.executable, "cli.py", "fit", "--trainer.max_epochs", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory: ")][-1]
    from pathlib import Path

    return Path(line.split(": ", 1)[1].strip())


def test_fit_writes_checkpoint_onnx_tensorboard(fit_run, runs_root):
    run = fit_run
    assert run.is_relative_to(runs_root / "fit" / "fit")
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts) and any("best" in p.name for p in ckpts)
    report = json.loads((run / "checkpoints" / "onnx_export.json").read_text())
    assert report["parity_max_abs_diff"] <= 1e-5 and report["parity_rows"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "val/auroc", "val/ece", "val/cascade_accuracy",
                "val/cascade_relative_cost", "export/latency_p50_us", "val/router_auroc",
                "val/cascade_routing_accuracy", "val/cascade_routing_relative_cost"):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    ckpt = torch.load(next(p for p in ckpts if "best" in p.name), weights_only=True)
    assert ckpt["feature_schema"]["name"] == "topk"
    spec = ckpt["prompt_embedding"]  # the router heads' embedding model, pinned by sha256
    assert spec["slug"] == "smollm2-135m-instruct" and len(spec["sha256"]) == 64
    # last.ckpt is the final state (epoch 2 of 3), whichever epoch was best: staged training
    # restarts from it.
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] >= ckpt["global_step"]


def test_onnx_runtime_refuses_wrong_schema_and_bad_files(fit_run, tmp_path):
    from toolkit.cascade.features import FeatureSchemaError, build_schema
    from toolkit.cascade.onnx_runtime import OnnxQualityPredictor, PredictorFileError

    onnx_path = fit_run / "checkpoints" / "predictor.onnx"
    rt = OnnxQualityPredictor(onnx_path)
    assert rt.reads_prompt and rt.embedding["slug"] == "smollm2-135m-instruct"
    emb = np.zeros((3, rt.embedding_dim), np.float32)
    probs = rt.predict(np.zeros((3, rt.schema.dim), np.float32), schema=build_schema("topk"),
                       embedding=emb)
    assert probs.shape == (3, 2) and ((probs >= 0) & (probs <= 1)).all()
    route = rt.route(emb)
    assert route.shape == (3, 3) and ((route >= 0) & (route <= 1)).all()
    with pytest.raises(ValueError, match="reads the prompt embedding"):
        rt.predict(np.zeros((1, rt.schema.dim), np.float32))
    with pytest.raises(ValueError, match=f"expected {rt.embedding_dim} prompt embedding"):
        rt.route(np.zeros((1, 7), np.float32))
    with pytest.raises(FeatureSchemaError, match="feature schema mismatch"):
        rt.predict(np.zeros((1, rt.schema.dim), np.float32), schema=build_schema("full"))
    with pytest.raises(ValueError, match="NaN"):
        rt.predict(np.full((1, rt.schema.dim), np.nan, np.float32), embedding=emb[:1])
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(onnx_path.read_bytes()[:200])
    with pytest.raises(PredictorFileError, match="not a valid ONNX predictor"):
        OnnxQualityPredictor(truncated)
    with pytest.raises(PredictorFileError, match="does not exist"):
        OnnxQualityPredictor(tmp_path / "missing.onnx")


def test_onnx_runtime_path_imports_no_torch():
    code = ("import sys, toolkit.cascade.onnx_runtime\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_only_one_onnx_runtime_installed():
    from importlib.metadata import PackageNotFoundError, distribution

    present = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            distribution(name)
            present.append(name)
        except PackageNotFoundError:
            pass
    assert len(present) <= 1, f"both {present} are installed: they overwrite each other"


def test_export_command_and_bad_checkpoints(fit_run, tmp_path):
    ckpt = fit_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "published"
    proc = subprocess.run([sys.executable, "cli.py", "export", "--ckpt", str(ckpt), "--to",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "predictor.onnx").is_file() and (out / "predictor.ckpt").is_file()
    assert json.loads((out / "onnx_export.json").read_text())["parity_max_abs_diff"] <= 1e-5
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "cli.py", "export", "--ckpt", str(cut)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is not a readable predictor checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
