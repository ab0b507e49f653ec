"""Export the quality predictor to one ONNX file, check it against torch, time it.

torch ≥ 2.9 exports with ``dynamo=True`` (needs ``onnxscript``); ``external_data=False``
keeps the weights inside the single ``.onnx`` file. The feature schema (and, for a predictor
with router heads, the prompt embedding's spec) go into the file's metadata so the runtime can
refuse mismatched inputs.

Graph inputs and outputs: ``features`` [B, F] -> ``probabilities`` [B, 2] (post-draft heads);
a predictor that reads the prompt also takes ``prompt_embedding`` [B, D] and returns
``router`` [B, L] (router heads), the projection to <= 64 dimensions inside the graph.
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


def _scaled_linear(linear: torch.nn.Linear, std: torch.Tensor, cols: slice) -> torch.nn.Linear:
    """A copy of ``linear`` whose input columns ``cols`` take centred, unscaled values: the
    division by ``std`` is folded into the weights (in float64).

    Only the division: folding the centring too (bias −= W·mean/std) makes the layer add
    large opposite terms when an input's mean is large next to its std, and float32 then
    loses ~1e-4 (measured on a tiny test bundle), past the 1e-5 parity bar. Centring stays a
    Sub node, exact.
    """
    w = linear.weight.detach().double().clone()
    w[:, cols] = w[:, cols] / std.detach().double()
    out = torch.nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        out.weight.copy_(w.float())
        out.bias.copy_(linear.bias.detach())
    return out


class _InferenceGraph(torch.nn.Module):
    """The exported inference path, with the standardisations' divisions folded into the
    first linear layers (each saved elementwise node is about a microsecond of a batch-1 ONNX
    call, most of its latency). ``check_parity`` compares the file with the unfolded module.

    Inputs ``features`` (and ``prompt_embedding``); outputs ``probabilities`` [B, 2] (and
    ``router`` [B, L])."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        layers = list(module.net)
        first = next(i for i, m in enumerate(layers) if isinstance(m, torch.nn.Linear))
        F = module.schema.dim
        layers[first] = _scaled_linear(layers[first], module.feat_std, slice(0, F))
        self.net = torch.nn.Sequential(*layers).eval()
        self.register_buffer("feat_mean", module.feat_mean.detach().clone())
        self.reads_prompt = bool(getattr(module, "reads_prompt", False))
        self.draft_reads_prompt = self.reads_prompt and module.hparams.draft_reads_prompt
        if self.reads_prompt:
            D = module.hparams.embedding_dim
            self.project = _scaled_linear(module.project, module.emb_std, slice(0, D))
            self.register_buffer("emb_mean", module.emb_mean.detach().clone())
            self.router_head = module.router_head

    def forward(self, features: torch.Tensor, prompt_embedding: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = features - self.feat_mean
        if not self.reads_prompt:
            return torch.sigmoid(self.net(x))
        code = self.project(prompt_embedding - self.emb_mean)
        x = torch.cat([x, code], dim=-1) if self.draft_reads_prompt else x
        return torch.sigmoid(self.net(x)), torch.sigmoid(self.router_head(code))


def example_inputs(module: LightningModule, rows: int = 2) -> dict[str, np.ndarray]:
    """Zero inputs of the module's graph, by input name."""
    x = {"features": np.zeros((rows, module.schema.dim), np.float32)}
    if getattr(module, "reads_prompt", False):
        x["prompt_embedding"] = np.zeros((rows, module.hparams.embedding_dim), np.float32)
    return x


def export_onnx(module: LightningModule, path: str | Path) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    inputs = {k: torch.from_numpy(v) for k, v in example_inputs(module).items()}
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    tmp = path.with_suffix(".onnx.tmp")
    graph = _InferenceGraph(module)
    outputs = ["probabilities", "router"][:len(inputs)]
    torch.onnx.export(graph.eval(), tuple(inputs.values()), str(tmp), dynamo=True,
                      external_data=False, input_names=list(inputs),
                      output_names=outputs, dynamic_shapes=tuple({0: batch} for _ in inputs),
                      verbose=False)
    model = onnx.load(str(tmp))
    meta = {"feature_schema": json.dumps(module.schema.to_dict()),
            "targets": json.dumps(["correct", "agreement"]),
            "hparams": json.dumps(dict(module.hparams), default=str)}
    if len(inputs) > 1:
        meta["prompt_embedding"] = json.dumps(module.embedding_spec or
                                              {"dim": module.hparams.embedding_dim})
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(tmp))
    tmp.replace(path)
    return path


def check_parity(module: LightningModule, path: str | Path, features: np.ndarray,
                 embeddings: np.ndarray | None = None) -> float:
    """Max |onnxruntime − torch| over the given rows (post-draft and, with ``embeddings``
    [N, D] of each row's prompt, router outputs); raises above PARITY_ATOL."""
    module = module.eval().cpu()
    runtime = OnnxQualityPredictor(path)
    with torch.no_grad():
        e = None if embeddings is None else torch.from_numpy(embeddings)
        ref = module(torch.from_numpy(features), e).numpy()
        diffs = [np.abs(runtime.predict(features, embedding=embeddings) - ref).max()]
        if e is not None:
            diffs.append(np.abs(runtime.route(embeddings) - module.route(e).numpy()).max())
    diff = float(max(diffs))
    if diff > PARITY_ATOL:
        raise AssertionError(f"ONNX and torch differ by {diff:.2e} > {PARITY_ATOL:g}")
    return diff


def latency_us(path: str | Path, calls: int = 2000) -> dict[str, float]:
    """Batch-1 latency of the ONNX runtime's call as served (``session.run`` on every input of
    the graph, random values), in microseconds (p50, p99)."""
    runtime = OnnxQualityPredictor(path)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.normal(size=(1, i.shape[1])).astype(np.float32)
             for i in runtime.session.get_inputs()}
    for _ in range(100):
        runtime.session.run(None, feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        runtime.session.run(None, feeds)
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
        dm = trainer.datamodule
        x, _ = dm.arrays("val")
        e = dm.embedding_arrays("val")[0] if getattr(module, "reads_prompt", False) else None
        report: dict[str, Any] = {"onnx": str(path), "checkpoint": best or None,
                                  "parity_max_abs_diff": check_parity(module, path, x, e),
                                  "parity_rows": len(x), **latency_us(path)}
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
