"""Token statistics and sampling on a batch of next-token logits (shared by every sampler).

Everything is a tensor op over the batch and the vocabulary; the only Python loop is over the
rows of a sampled batch, because each request draws from its own seeded generator (so a
request's tokens do not depend on which other requests share its batch).
"""

from __future__ import annotations

import sys

import torch


def token_stats(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Chosen-token log-prob, top-1 log-prob, entropy and top-k of full distributions.

    Args:
        logprobs: [B, V] log-softmax of the untempered logits (float32 or wider).
        chosen: [B] token ids that were emitted.
        k: number of top log-probs to return (0 for none).
    """
    out = {
        "token_logprobs": logprobs.gather(-1, chosen[:, None]).squeeze(-1),
        # exp(logp) * logp is 0 * -inf = nan where p underflows to 0; those terms are exactly 0.
        "entropies": -(logprobs.exp() * logprobs).nan_to_num(0.0).sum(-1),
    }
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        out["top1_logprobs"], out["top_logprobs"], out["top_ids"] = top_lp[:, 0], top_lp, top_ids
    else:
        out["top1_logprobs"] = logprobs.max(-1).values
    return out


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus, per row.

    The most likely token always survives, so a row never becomes empty.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_rows(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Draw one token per row from softmax(logits) with that row's generator (Gumbel-max)."""
    uniform = torch.stack([
        torch.rand(logits.shape[-1], generator=g, dtype=torch.float64, device=logits.device)
        for g in generators
    ])
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() + gumbel).argmax(-1)


def make_generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for (seed, stream): independent of batch composition and order."""
    g = torch.Generator(device=device)
    # Mix the two integers so (s, i) and (s + 1, i - 1) do not collide.
    g.manual_seed((seed * 1_000_003 + stream * 7_919 + 12_345) % (2**63 - 1))
    return g


MIN_TEMPERATURE = sys.float_info.min
"""Below this (the smallest normal float64, ~2.2e-308) sampling is greedy. That is exact, not an
approximation: two different float32 logits differ by at least ~1.4e-45, so every other token's
probability exp(-gap / T) underflows to 0 and softmax(logits / T) is a point mass on the argmax
(exact ties aside); and dividing by a subnormal T could flush it to zero (0 / 0 = nan)."""


def temperature_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` up to a per-row constant, safe for any temperature > 0.

    Each row's maximum is subtracted first, so every value is <= 0 and a tiny temperature
    sends the others to -inf instead of overflowing to +inf (``logits / 1e-45`` in float32 is
    ±inf, and softmax of inf - inf is nan: an empty answer). Softmax, top-p and the Gumbel-max
    sample are unchanged by the shift. The division runs in float64 and the result is float32
    (values beyond float32's range become -inf, whose probability is 0 anyway).
    """
    wide = logits.double()
    return ((wide - wide.amax(-1, keepdim=True)) / temperature).float()


def choose_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: list[torch.Generator] | None) -> torch.Tensor:
    """Greedy argmax when temperature is 0 (or below ``MIN_TEMPERATURE``), else a seeded sample
    from the filtered, temperature-scaled softmax."""
    if temperature < MIN_TEMPERATURE:
        return logits.argmax(-1)
    filtered = filter_top_k_top_p(temperature_scaled(logits, temperature), top_k, top_p)
    assert generators is not None, "sampling needs one generator per row"
    return sample_rows(filtered, generators)
