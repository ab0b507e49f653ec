"""The seed's Python API (SPEC §A), as a thin layer over the toolkit.

Names, arguments and return fields follow the seed; the work is done by the generation
backend, the feature schema, the ONNX predictor, the stopping policy and the live runner.
One deliberate difference: the seed's ``optimal_stopping_rule`` never escalates (SPEC §A), so
``AdaptiveSpeculativePipeline`` decides with a policy fitted on labelled calibration records
(``stopping.fit_policy``); the seed's rule is still importable for comparison.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.cascade.features import FeatureSchema, build_schema, record_features
from toolkit.cascade.live import LiveCascade
from toolkit.cascade.onnx_runtime import OnnxQualityPredictor
from toolkit.cascade.predictor_module import QualityPredictor
from toolkit.cascade.replay import policy_from_records
from toolkit.cascade.stopping import optimal_stopping_rule
from toolkit.generation.base import DecodingConfig, GenerationRequest

__all__ = ["Stage", "FeatureExtractor", "QualityPredictor", "optimal_stopping_rule",
           "AdaptiveSpeculativePipeline"]


class Stage:
    """One model of the ladder (seed: a vLLM engine; here any backend, transformers default).

    Args:
        model_name: zoo:<slug>, a local folder or a hub id.
        quantization: None or "nf4" (the seed's 4-bit bitsandbytes).
        backend: "transformers" or "vllm" (GPU servers).
        tensor_parallel_size: GPUs for the vLLM backend.
    """

    def __init__(self, model_name: str, quantization: str | None = None,
                 backend: str = "transformers", tensor_parallel_size: int = 1) -> None:
        if backend == "vllm":
            from toolkit.generation.vllm_backend import VLLMBackend

            self.engine = VLLMBackend(model_name, tensor_parallel_size,
                                      quantisation=quantization or "none")
        else:
            from toolkit.generation.hf_backend import TransformersBackend

            self.engine = TransformersBackend(model_name, quantisation=quantization or "none")
        self.model_name = model_name

    @property
    def cost_per_token(self) -> float:
        """FLOPs per processed token: 2 · non-embedding parameters."""
        return 2.0 * self.engine.info.non_embedding_params

    def kv_cache_bytes(self, seq_len: int, batch: int = 1) -> int:
        """Size of the KV cache for ``batch`` sequences of ``seq_len`` tokens."""
        cfg = getattr(getattr(self.engine, "model", None), "config", None)
        if cfg is None:
            raise NotImplementedError("KV size needs the model config (transformers backend)")
        heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        bytes_per = 2 if str(getattr(cfg, "dtype", "float32")).endswith("16") else 4
        return 2 * cfg.num_hidden_layers * heads * head_dim * seq_len * batch * bytes_per

    def generate(self, prompts: list[str], max_tokens: int = 512, temperature: float = 0.7,
                 top_p: float = 0.9) -> list[dict[str, Any]]:
        """Texts and per-token top-5 log-probs (the seed's defaults: T 0.7, top-p 0.9)."""
        cfg = DecodingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
        outs = self.engine.generate([GenerationRequest(p) for p in prompts], cfg)
        return [{"text": o.text, "token_ids": o.token_ids.tolist(),
                 "logprobs": o.token_logprobs.tolist(), "top_logprobs": o.top_logprobs.tolist(),
                 "prompt_tokens": o.prompt_tokens, "generated_tokens": o.generated_tokens}
                for o in outs]


class FeatureExtractor:
    """Feature vectors of stage outputs under a versioned schema (default topk-v1)."""

    def __init__(self, schema: str = "topk", num_stages: int = 3) -> None:
        self.schema: FeatureSchema = build_schema(schema, num_stages)

    def extract(self, record: dict[str, Any]) -> np.ndarray:
        return record_features(record, self.schema)


class AdaptiveSpeculativePipeline:
    """The seed's pipeline: ``process_request`` runs the cascade on one prompt.

    Args:
        stages: the ladder, smallest first.
        predictor: path of the exported ``predictor.onnx`` (or an OnnxQualityPredictor).
        lambda_value: λ, the price of a wrong answer in top-stage calls.
        risk_adjustment: None, or (α0, β0) of the Beta prior (seed: Beta(1,1), Beta(2,2)).
        calibration_dir: labelled records the stopping policy is fitted on.
        task: the prompts' task (the policy's prompt-only entry decision), e.g. "humaneval".
    """

    def __init__(self, stages: list[Stage], predictor: str | Path | OnnxQualityPredictor,
                 lambda_value: float = 1.0, risk_adjustment: tuple[float, float] | None = None,
                 calibration_dir: str = "data/cascade", task: str = "") -> None:
        pred = predictor if isinstance(predictor, OnnxQualityPredictor) else \
            OnnxQualityPredictor(predictor)
        self.policy = policy_from_records(calibration_dir, pred, lambda_value,
                                          risk_prior=risk_adjustment, by_task=bool(task))
        self.stages, self.task = stages, task
        self.runner = LiveCascade([s.engine for s in stages], pred, self.policy)
        self._latency: list[float] = []
        self._stops: Counter[int] = Counter()
        self._quality: list[float] = []

    def process_request(self, prompt: str, max_tokens: int = 512) -> dict[str, Any]:
        self.runner.decoding = DecodingConfig(max_new_tokens=max_tokens)
        r = self.runner.run([prompt], [self.task])[0]
        self._latency.append(r.latency_ms)
        self._stops[r.stopped_at_stage] += 1
        self._quality.append(r.stage_probabilities[-1])
        return {"output": r.output, "stopped_at_stage": r.stopped_at_stage,
                "latency_ms": r.latency_ms, "stage_probabilities": r.stage_probabilities,
                "costs": [t.cost_flops for t in r.trace],
                "trace": [t.__dict__ for t in r.trace]}

    @property
    def stats(self) -> dict[str, Any]:
        n = len(self._latency)
        return {"total_requests": n,
                "stops_per_stage": [self._stops[k] for k in range(len(self.stages))],
                "avg_latency_ms": statistics.fmean(self._latency) if n else 0.0,
                "avg_quality": statistics.fmean(self._quality) if n else 0.0}
