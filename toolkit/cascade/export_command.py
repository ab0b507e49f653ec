"""``python cli.py export``: publish a predictor checkpoint as ONNX (parity-checked, timed).

Kept apart from :mod:`toolkit.cascade.onnx_export` so that ``export --help`` and argument
errors import neither torch nor Lightning (the CLI imports this module to build the help);
the exporter is imported only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _card(report: dict[str, Any], data_dir: str) -> str:
    """A model card for a published predictor (what it is, how it was made, what it needs)."""
    schema, hp = report["feature_schema"], report["hparams"]
    emb = report.get("prompt_embedding")
    router = [] if not emb else [
        f"- router heads: P(stage k answers correctly) from the prompt alone; they read the "
        f"mean-pooled hidden states (layers {emb.get('layers')}, {emb.get('dim')} wide) of "
        f"`{emb.get('slug')}` (sha256 {str(emb.get('sha256'))[:12]}…), projected to "
        f"{hp.get('projection_dim')} dimensions inside the graph (ONNX input "
        f"`prompt_embedding`, output `router`); the post-draft heads read that projection "
        f"too: {hp.get('draft_reads_prompt')}"]
    return "\n".join([
        "# Cascade quality predictor", "",
        f"MLP {hp.get('hidden')} with two heads (ground-truth correctness; agreement with the "
        f"top stage), trained by `python cli.py fit` on the labelled records in `{data_dir}` "
        "(see its data card) and published with",
        "", f"    python cli.py export --ckpt {report['checkpoint']} --to <this folder>", "",
        f"- feature schema `{schema['name']}-v{schema['version']}` ({len(schema['names'])} "
        f"features, {schema['num_stages']} stages; full-distribution entropy needed: "
        f"{schema['needs_full_entropy']}): {', '.join(schema['names'])}",
        *router,
        f"- ONNX parity with torch: max abs difference {report['parity_max_abs_diff']:.1e} on "
        f"{report['parity_rows']} validation rows",
        f"- ONNX latency at export time, batch 1, 1 thread: p50 {report['p50_us']:.1f} µs, "
        f"p99 {report['p99_us']:.1f} µs (`python benchmarks/predictor_latency.py` compares "
        "with torch side by side)",
        f"- hyper-parameters: {json.dumps(hp, default=str)}",
        "", "Files: `predictor.ckpt` (Lightning), `predictor.onnx` (schema in its metadata), "
        "`onnx_export.json` (this report as JSON).", ""])


def export(ckpt: str, to: str | None = None, data_dir: str = "data/cascade") -> dict[str, Any]:
    """Export a predictor checkpoint to ONNX, check it against torch, and time it.

    Args:
        ckpt: a QualityPredictor checkpoint (.ckpt) from `python cli.py fit`.
        to: folder to publish into (e.g. checkpoints/cascade/predictor): the .ckpt, the .onnx
            and a card are written there; default: beside the checkpoint.
        data_dir: labelled records whose validation features check ONNX/torch parity.
    """
    import shutil

    from toolkit.cascade.onnx_export import check_parity, export_onnx, latency_us, load_predictor
    from toolkit.cascade.records_datamodule import CascadeRecordsDataModule

    module = load_predictor(ckpt)
    folder = Path(to) if to else Path(ckpt).parent
    folder.mkdir(parents=True, exist_ok=True)
    path = export_onnx(module, folder / "predictor.onnx")
    spec = module.embedding_spec if module.reads_prompt else None
    dm = CascadeRecordsDataModule(data_dir, module.hparams.schema, module.hparams.num_stages,
                                  embedding_model=(spec or {}).get("slug"))
    x, _ = dm.arrays("val")
    e = dm.embedding_arrays("val")[0] if spec else None
    report = {"onnx": str(path), "checkpoint": str(ckpt),
              "parity_max_abs_diff": check_parity(module, path, x, e), "parity_rows": len(x),
              **latency_us(path), "feature_schema": module.schema.to_dict(),
              "hparams": dict(module.hparams), "prompt_embedding": spec}
    if to:
        shutil.copyfile(ckpt, folder / "predictor.ckpt")
        (folder / "README.md").write_text(_card(report, data_dir))
    (folder / "onnx_export.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"exported {path}: max |onnx - torch| = {report['parity_max_abs_diff']:.1e} on "
          f"{len(x)} val rows; batch-1 p50 {report['p50_us']:.1f} µs, "
          f"p99 {report['p99_us']:.1f} µs")
    return report
