"""A LLaDA-compatible masked-diffusion transformer with KV caches for Fast-dLLM style decoding.

The module tree reproduces the parameter names of the GSAI-ML LLaDA checkpoints
(``model.transformer.wte``, ``model.transformer.blocks.N.{q,k,v}_proj``, ``attn_out``,
``ff_proj``, ``up_proj``, ``ff_out``, ``attn_norm``, ``ff_norm``, ``model.transformer.ln_f``,
``model.transformer.ff_out``), so their safetensors load with ``strict=True``. The architecture
is LLaDA's "llama" block: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention, and no
causal mask (the model denoises the whole sequence at once).

Caches (``KVCache``) hold keys *after* RoPE together with each key's position and padding flag,
so a cached forward never has to know where its keys came from:

* append (prefix cache): ``past_key_values`` without ``replace_position``; the new tokens'
  keys are concatenated after the cached ones.
* splice (dual cache): ``replace_position`` names the cache slots the new tokens occupy; their
  keys/values overwrite those slots *in place* and the queries attend to the whole cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LLaDAConfig:
    """The subset of a LLaDA ``config.json`` that defines the network.

    Keys of the checkpoint's config that do not change the computation (initialisation, dropout
    at inference, flash-attention flags) are ignored; keys that select an architecture this
    module does not implement raise ``ValueError`` in :meth:`from_dict`.
    """

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = None
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_sequence_length: int = 4096
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def output_size(self) -> int:
        return self.embedding_size or self.vocab_size

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LLaDAConfig:
        """Build from a LLaDA ``config.json`` dictionary, rejecting unsupported variants."""
        unsupported = {
            "block_type": ("llama", None), "layer_norm_type": ("rms", None),
            "activation_type": ("silu", "swiglu", None), "alibi": (False, None),
            "rope": (True, None), "attention_layer_norm": (False, None),
            "block_group_size": (1, None), "multi_query_attention": (False, None),
        }
        for key, allowed in unsupported.items():
            if raw.get(key) not in allowed:
                raise ValueError(f"LLaDA config {key}={raw.get(key)!r} is not supported "
                                 f"(supported: {[a for a in allowed if a is not None]})")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in raw.items() if k in names})
        if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"d_model {cfg.d_model}, n_heads {cfg.n_heads} and n_kv_heads "
                             f"{cfg.kv_heads} must divide evenly")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A ``config.json`` dictionary that the reference implementation also accepts."""
        out = dataclasses.asdict(self)
        out.update(block_type="llama", layer_norm_type="rms", activation_type="silu",
                   alibi=False, rope=True, rope_full_precision=True, block_group_size=1,
                   attention_layer_norm=False, model_type="llada",
                   architectures=["LLaDAModelLM"])
        return out


@dataclass
class KVCache:
    """Per-layer keys (RoPE applied) and values, shape ``(B, n_kv_heads, S, head_dim)``.

    Attributes:
        keys: One tensor per layer.
        values: One tensor per layer.
        key_mask: ``(B, S)`` bool, False where the slot is padding and must not be attended.
        positions: ``(B, S)`` rotary positions of the cached slots.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.keys[layer], self.values[layer]

    @property
    def length(self) -> int:
        return self.key_mask.shape[1]

    def truncate(self, length: int) -> KVCache:
        """The first ``length`` slots (views, no copy): a prefix cache."""
        return KVCache([k[:, :, :length] for k in self.keys],
                       [v[:, :, :length] for v in self.values],
                       self.key_mask[:, :length], self.positions[:, :length])

    def select_rows(self, rows: Tensor) -> KVCache:
        """A copy holding only batch rows ``rows``."""
        return KVCache([k.index_select(0, rows) for k in self.keys],
                       [v.index_select(0, rows) for v in self.values],
                       self.key_mask.index_select(0, rows), self.positions.index_select(0, rows))

    def write_rows(self, rows: Tensor, other: KVCache) -> None:
        """Copy ``other`` (one row per entry of ``rows``) into those batch rows, in place."""
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine.index_copy_(0, rows, theirs)
        self.key_mask.index_copy_(0, rows, other.key_mask)
        self.positions.index_copy_(0, rows, other.positions)

    @classmethod
    def empty_like(cls, other: KVCache, batch: int) -> KVCache:
        """Zeroed storage shaped like ``other`` but with ``batch`` rows."""
        def grow(t: Tensor) -> Tensor:
            return t.new_zeros((batch, *t.shape[1:]))
        return cls([grow(k) for k in other.keys], [grow(v) for v in other.values],
                   grow(other.key_mask), grow(other.positions))


@dataclass
class LLaDAOutput:
    """Forward result: ``logits`` (B, T, vocab) and the cache when ``use_cache`` was set."""

    logits: Tensor
    past_key_values: KVCache | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The reference runs norms and RoPE in float32 even for bf16 weights; float64 models keep
    # float64 so that float64 equality tests are not limited by a float32 detour.
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """RMS normalisation with a learned scale (LLaDA's ``rms`` layer norm, no bias)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(_compute_dtype(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q: Tensor, k: Tensor, positions: Tensor, theta: float) -> tuple[Tensor, Tensor]:
    """Rotate ``q``/``k`` (B, H, T, D) by per-token ``positions`` (B, T)."""
    dtype = _compute_dtype(q.dtype)
    dim = q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=q.device, dtype=dtype) / dim))
    freqs = positions.to(dtype)[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    cos, sin = angles.cos(), angles.sin()
    q_, k_ = q.to(dtype), k.to(dtype)
    return ((q_ * cos + _rotate_half(q_) * sin).to(q.dtype),
            (k_ * cos + _rotate_half(k_) * sin).to(k.dtype))


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with bidirectional attention and a SwiGLU MLP."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.include_bias)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.hidden_size, bias=cfg.include_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden_size, bias=cfg.include_bias)
        self.ff_out = nn.Linear(cfg.hidden_size, cfg.d_model, bias=cfg.include_bias)

    def forward(self, x: Tensor, positions: Tensor, attn_mask: Tensor | None, layer: int,
                past: KVCache | None, replace_index: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (output, keys, values): every key/value attended, cached ones included."""
        cfg = self.cfg
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, k, positions, cfg.rope_theta)
        keys, values = k, v
        if past is not None and replace_index is None:
            keys = torch.cat((past.keys[layer], k), dim=2)
            values = torch.cat((past.values[layer], v), dim=2)
        elif past is not None:
            idx = replace_index[:, None, :, None].expand(-1, cfg.kv_heads, -1, cfg.head_dim)
            keys = past.keys[layer].scatter_(2, idx, k)
            values = past.values[layer].scatter_(2, idx, v)
        # GQA: each K/V head serves n_heads / n_kv_heads consecutive query heads.
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask,
                                             enable_gqa=cfg.kv_heads != cfg.n_heads)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, cfg.d_model))
        h = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        return x, keys, values


class LLaDAModelLM(nn.Module):
    """LLaDA mask predictor. ``state_dict`` keys match the GSAI-ML checkpoints exactly."""

    supports_kv_cache = True

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.output_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
        })
        if not config.weight_tying:
            transformer["ff_out"] = nn.Linear(config.d_model, config.output_size,
                                              bias=config.include_bias)
        self.model = nn.Module()
        self.model.transformer = transformer

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    @classmethod
    def from_config(cls, config: LLaDAConfig | dict[str, Any], *, seed: int | None = None,
                    dtype: torch.dtype | None = None) -> LLaDAModelLM:
        """A randomly initialised model (normal(0, init_std) weights, unit norm scales)."""
        cfg = config if isinstance(config, LLaDAConfig) else LLaDAConfig.from_dict(config)
        model = cls(cfg)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * cfg.init_std)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LLaDAModelLM:
        """Load ``config.json`` and the safetensors weights of a LLaDA checkpoint folder.

        Weights are the shards named by ``model.safetensors.index.json``, else
        ``model.safetensors``, else every ``*.safetensors`` file in the folder.

        The module is built on the meta device and the checkpoint tensors are assigned into it,
        so an 8B checkpoint is held in memory once. Loading is strict.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = LLaDAConfig.from_dict(json.loads((folder / "config.json").read_text()))
        index = folder / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [folder / s for s in shards]
        elif (folder / "model.safetensors").exists():
            # Other safetensors files may sit beside the weights (e.g. reference outputs).
            files = [folder / "model.safetensors"]
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f), device=str(device)))
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` in the checkpoint layout."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        return folder

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: KVCache | None = None,
                use_cache: bool = False, replace_position: Tensor | slice | None = None
                ) -> LLaDAOutput:
        """Predict every position's token distribution.

        Args:
            input_ids: ``(B, T)`` token ids (the new tokens only when a cache is given).
            attention_mask: ``(B, T)`` 1 for real tokens, 0 for padding, for ``input_ids``;
                cached slots carry their own flags. Or a ``(B, T, T)`` boolean query × key
                mask (True: may attend), without a cache and with ``position_ids``: for
                sequences that hold extra copies of positions (WINO's shadow block).
            position_ids: ``(B, T)`` rotary positions. Default: ``cumsum(mask) - 1`` without
                a cache, the slot after the cache's last position in append mode, and the
                replaced slots' own positions in splice mode.
            past_key_values: A :class:`KVCache` from an earlier ``use_cache=True`` call.
            use_cache: Return the cache (the concatenation in append mode, the updated cache
                in splice mode, the new one otherwise).
            replace_position: Splice mode: the cache slots the ``T`` new tokens occupy, as a
                ``(B, S)`` bool mask with ``T`` True per row, a ``(T,)`` or ``(B, T)`` index
                tensor, or a slice. The cache is updated in place.

        Returns:
            :class:`LLaDAOutput` with ``logits`` ``(B, T, vocab)``.
        """
        b, t = input_ids.shape
        dev = input_ids.device
        pair_mask = None
        if attention_mask is not None and attention_mask.dim() == 3:
            if past_key_values is not None or use_cache or position_ids is None:
                raise ValueError("a (B, T, T) attention mask needs position_ids and no cache")
            pair_mask, attention_mask = attention_mask.to(torch.bool)[:, None], None
        am = (torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None
              else attention_mask.to(torch.bool))
        replace_index = None
        if past_key_values is None:
            if replace_position is not None:
                raise ValueError("replace_position needs past_key_values")
            if position_ids is None:
                position_ids = (am.long().cumsum(-1) - 1).clamp(min=0)
            key_mask = am
        else:
            if len(past_key_values) != self.config.n_layers:
                raise ValueError(f"cache has {len(past_key_values)} layers, model has "
                                 f"{self.config.n_layers}")
            if replace_position is None:
                if position_ids is None:
                    start = past_key_values.positions[:, -1:] + 1
                    position_ids = start + (am.long().cumsum(-1) - 1).clamp(min=0)
                key_mask = torch.cat((past_key_values.key_mask, am), dim=1)
            else:
                replace_index = self._replace_index(replace_position, b, t,
                                                    past_key_values.length, dev)
                if position_ids is None:
                    position_ids = past_key_values.positions.gather(1, replace_index)
                past_key_values.key_mask.scatter_(1, replace_index, am)
                past_key_values.positions.scatter_(1, replace_index, position_ids)
                key_mask = past_key_values.key_mask
        tr = self.model.transformer
        x = tr.wte(input_ids)
        if self.config.input_emb_norm:
            x = x * self.config.d_model ** 0.5
        # Padding keys are excluded; queries are never masked by position (no causal mask).
        attn_mask = None if bool(key_mask.all()) else key_mask[:, None, None, :]
        if pair_mask is not None:
            attn_mask = pair_mask
        all_keys, all_values = [], []
        for layer, block in enumerate(tr.blocks):
            x, k, v = block(x, position_ids, attn_mask, layer, past_key_values, replace_index)
            all_keys.append(k)
            all_values.append(v)
        x = tr.ln_f(x)
        logits = F.linear(x, tr.wte.weight) if self.config.weight_tying else tr.ff_out(x)
        if self.config.scale_logits:
            logits = logits / math.sqrt(self.config.d_model)
        cache = None
        if use_cache and replace_index is not None:
            cache = past_key_values
        elif use_cache:
            all_positions = (position_ids if past_key_values is None
                             else torch.cat((past_key_values.positions, position_ids), 1))
            cache = KVCache(all_keys, all_values, key_mask.clone(), all_positions.clone())
        return LLaDAOutput(logits=logits, past_key_values=cache)

    @staticmethod
    def _replace_index(replace: Tensor | slice, b: int, t: int, length: int,
                       device: torch.device) -> Tensor:
        """Normalise ``replace_position`` to a ``(B, T)`` index tensor."""
        if isinstance(replace, slice):
            idx = torch.arange(length, device=device)[replace]
        elif replace.dtype == torch.bool:
            if replace.dim() == 1:
                replace = replace.expand(b, -1)
            counts = replace.sum(-1)
            if bool((counts != t).any()):
                raise ValueError(f"replace_position marks {counts.tolist()} slots per row, "
                                 f"but {t} tokens were given")
            idx = replace.nonzero()[:, 1].view(b, t)
        else:
            idx = replace.to(device=device, dtype=torch.long)
        if idx.dim() == 1:
            idx = idx.expand(b, -1)
        if idx.shape != (b, t):
            raise ValueError(f"replace_position selects {tuple(idx.shape)} slots, "
                             f"expected {(b, t)}")
        return idx.contiguous()
