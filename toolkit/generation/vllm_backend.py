"""The vLLM generation backend, for GPU servers: a thin mapping onto ``vllm.LLM``.

NOT RUN ON OUR MACHINES. vLLM cannot be installed or run where this toolkit is developed (no
GPU on the CI machines; its wheel pins its own torch and is far too large for the lent GPU), so
this adapter has never executed here. It is deliberately thin: it maps ``DecodingConfig`` onto
``SamplingParams`` and vLLM's per-token logprobs onto ``GenerationOutput``. The shared backend
conformance tests (tests/shared/test_backend_conformance.py) run on it wherever ``vllm`` imports.

What differs from the transformers backend, and why:

* vLLM returns only the top-k log-probs of each position, not the full distribution, so
  ``entropies`` is None here (the cascade's default feature schema uses only top-5 log-probs
  for this reason); ``top1_logprobs`` is the first of the returned top-k.
* ``token_logprobs`` is vLLM's log-prob of the sampled token as vLLM reports it (raw model
  log-probs in recent versions; check ``logprobs_mode`` of the installed version).
* Per-request wall time is the whole ``generate`` call (vLLM schedules requests internally).
* vLLM exposes no hidden states, so it cannot serve the post-draft probe schema (``probe-v1``,
  pooled hidden states over the answer), nor any schema that needs the full entropy:
  ``feature_schemas`` lists only those built from top-k log-probs; a predictor needing more is
  refused at start with a pointer to ``topk-v1``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.generation.base import (
    DecodingConfig,
    GenerationOutput,
    GenerationRequest,
    Messages,
    ModelInfo,
)
from toolkit.models import loading


class VLLMBackend:
    """Generate with vLLM (GPU servers only; install with ``pip install -e '.[vllm]'``).

    Args:
        model: ``zoo:<slug>``, a local folder or a hub id.
        tensor_parallel_size: GPUs per model (the seed: 8B→1, 13B→2, 34B→2, 70B→4).
        quantisation: ``none``, or ``nf4`` (bitsandbytes 4-bit, as vLLM calls it).
        gpu_memory_utilization: fraction of GPU memory vLLM may take.
    """

    name = "vllm"
    #: Only schemas computed from chosen and top-k log-probs: no hidden states (``probe-v1``)
    #: and no full-distribution entropy (``full-v1``, ``no_logprobs-v1``, ``seed-v1``).
    feature_schemas = ("topk-v1", "no_entropy-v1", "minimal-v1")

    def __init__(self, model: str, tensor_parallel_size: int = 1, quantisation: str = "none",
                 gpu_memory_utilization: float = 0.85, **llm_kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("the vLLM backend needs vllm: pip install -e '.[vllm]' "
                              "(in its own environment, on a GPU server)") from None
        resolved = loading.resolve(model)
        kwargs = dict(tensor_parallel_size=tensor_parallel_size,
                      gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)
        if quantisation == "nf4":
            kwargs["quantization"] = "bitsandbytes"
        self.llm = LLM(model=resolved.path, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        cfg = self.llm.llm_engine.model_config.hf_config
        hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
        vocab = cfg.vocab_size
        # Non-embedding parameters from the config (vLLM hides the torch module).
        total = _config_non_embedding(cfg, hidden, layers, vocab)
        self.info = ModelInfo(name=model, slug=resolved.slug, sha256=resolved.sha256,
                              path=resolved.path, non_embedding_params=total,
                              quantisation=quantisation, vocab_size=vocab, backend=self.name)

    def _prompt_text(self, prompt: str | Messages, config: DecodingConfig) -> str:
        if not config.chat_template:
            return prompt if isinstance(prompt, str) else ""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if config.system_prompt:
            messages = [{"role": "system", "content": config.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def count_tokens(self, prompt: str | Messages, config: DecodingConfig) -> int:
        return len(self.tokenizer(self._prompt_text(prompt, config),
                                  add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[GenerationRequest], config: DecodingConfig,
                 batch_size: int = 8) -> list[GenerationOutput]:
        from vllm import SamplingParams

        k = max(config.top_logprobs, 1) if config.token_stats else None
        params = [SamplingParams(
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or -1,
            max_tokens=r.max_new_tokens or config.max_new_tokens, logprobs=k,
            seed=(config.seed * 1_000_003 + (r.seed if r.seed is not None else i)))
            for i, r in enumerate(requests)]
        prompts = [self._prompt_text(r.prompt, config) for r in requests]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        return [_to_output(o, wall, k) for o in outs]


def _config_non_embedding(cfg: Any, hidden: int, layers: int, vocab: int) -> int:
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    head_dim = getattr(cfg, "head_dim", hidden // heads)
    attn = hidden * head_dim * (heads + 2 * kv) + heads * head_dim * hidden
    mlp = 3 * hidden * inter
    head = 0 if getattr(cfg, "tie_word_embeddings", False) else hidden * vocab
    return layers * (attn + mlp) + head


def _to_output(o: Any, wall: float, k: int | None) -> GenerationOutput:
    c = o.outputs[0]
    ids = np.asarray(c.token_ids, dtype=np.int64)
    out = GenerationOutput(text=c.text, token_ids=ids, prompt_tokens=len(o.prompt_token_ids),
                           stop_reason="eos" if c.finish_reason == "stop" else "length",
                           wall_s=wall)
    if k and c.logprobs:
        chosen, top_ids, top_lp = [], [], []
        for tok, pos in zip(c.token_ids, c.logprobs):
            ranked = sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:k]
            chosen.append(pos[tok].logprob)
            top_ids.append([t for t, _ in ranked])
            top_lp.append([lp.logprob for _, lp in ranked])
        out.token_logprobs = np.asarray(chosen, dtype=np.float32)
        out.top_ids = np.asarray(top_ids, dtype=np.int64)
        out.top_logprobs = np.asarray(top_lp, dtype=np.float32)
        out.top1_logprobs = out.top_logprobs[:, 0]
    return out
