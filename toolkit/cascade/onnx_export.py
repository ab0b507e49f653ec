"""Export the quality predictor to one ONNX file, check it against torch, time it.

torch ≥ 2.9 exports with ``dynamo=True`` (needs ``onnxscript``); ``external_data=False``
keeps the weights inside the single ``.onnx`` file. The feature schema and the training
checkpoint's hash go into the file's metadata so the runtime can refuse mismatched inputs.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.common.errors import UserError

PARITY_ATOL = 1e-5


class _Probabilities(torch.nn.Module):
    """Only the inference path (standardise → MLP → sigmoid), in eval mode."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.module(features)


def export_onnx(module: LightningModule, path: str | Path) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    example = torch.zeros(2, module.schema.dim)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    tmp = path.with_suffix(".onnx.tmp")
    torch.onnx.export(_Probabilities(module).eval(), (example,), str(tmp), dynamo=True,
                      external_data=False, input_names=["features"],
                      output_names=["probabilities"], dynamic_shapes=({0: batch},),
                      verbose=False)
    model = onnx.load(str(tmp))
    meta = {"feature_schema": json.dumps(module.schema.to_dict()),
            "targets": json.dumps(["correct", "agreement"]),
            "hparams": json.dumps(dict(module.hparams), default=str)}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def check_parity(module: LightningModule, path: str | Path, features: np.ndarray) -> float:
    """Max |onnxruntime − torch| over the given feature rows; raises above PARITY_ATOL."""
    with torch.no_grad():
        ref = module.eval().cpu()(torch.from_numpy(features)).numpy()
    got = OnnxQualityPredictor(path).predict(features)
    diff = float(np.abs(got - ref).max())
    if diff > PARITY_ATOL:
        raise AssertionError(f"ONNX and torch differ by {diff:.2e} > {PARITY_ATOL:g}")
    return diff


def latency_us(path: str | Path, dim: int, calls: int = 2000) -> dict[str, float]:
    """Batch-1 latency of the ONNX runtime in microseconds (p50, p99)."""
    runtime = OnnxQualityPredictor(path)
    x = np.random.default_rng(0).normal(size=(1, dim)).astype(np.float32)
    for _ in range(100):
        runtime.session.run(None, {runtime.input_name: x})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        runtime.session.run(None, {runtime.input_name: x})
        times.append((time.perf_counter_ns() - t0) / 1e3)
    times.sort()
    return {"p50_us": statistics.median(times), "p99_us": times[int(0.99 * len(times))]}


class ExportOnnx(Callback):
    """At the end of fit: export the best checkpoint to ``predictor.onnx`` beside it.

    Checks onnxruntime against torch on the validation features (max abs diff ≤ 1e-5) and
    logs batch-1 latency; the results go to ``onnx_export.json`` beside the file.
    """

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt else ""
        module = type(pl_module).load_from_checkpoint(best) if best else pl_module
        folder = Path(best).parent if best else Path(trainer.default_root_dir)
        path = export_onnx(module, folder / "predictor.onnx")
        x, _ = trainer.datamodule.arrays("val")
        report: dict[str, Any] = {"onnx": str(path), "checkpoint": best or None,
                                  "parity_max_abs_diff": check_parity(module, path, x),
                                  "parity_rows": len(x), **latency_us(path, x.shape[1])}
        (folder / "onnx_export.json").write_text(json.dumps(report, indent=1))
        for logger in trainer.loggers:
            logger.log_metrics({"export/parity_max_abs_diff": report["parity_max_abs_diff"],
                                "export/latency_p50_us": report["p50_us"],
                                "export/latency_p99_us": report["p99_us"]})
        print(f"exported {path} (max |onnx - torch| = {report['parity_max_abs_diff']:.1e}, "
              f"batch-1 p50 {report['p50_us']:.1f} µs, p99 {report['p99_us']:.1f} µs)")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read as a quality predictor."""


def load_predictor(ckpt: str | Path) -> LightningModule:
    from toolkit.cascade.predictor_module import QualityPredictor

    path = Path(ckpt)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return QualityPredictor.load_from_checkpoint(str(path), map_location="cpu").eval()
    except Exception as err:  # torch/zip/pickle errors for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable predictor checkpoint "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:160]})"
                              ) from None
