"""Every decoding policy by name: ``make_policy("fastdllm", threshold=0.9)``.

The protocol and the published samplers are in :mod:`toolkit.dllm.policies`; the seed's
adaptive scheduler and the training-free peers build on it in their own modules. The registry
sits above all three, so none of them imports another module that imports it back.
"""

from __future__ import annotations

from typing import Any

from toolkit.dllm.adaptive_policy import AdaptivePolicy
from toolkit.dllm.peer_policies import EntropyBoundedPolicy, WinoPolicy
from toolkit.dllm.policies import DecodeInputError, FastDLLMPolicy, LLaDAPolicy, Policy

POLICIES: dict[str, type[Policy]] = {
    "llada": LLaDAPolicy, "fastdllm": FastDLLMPolicy, "adaptive": AdaptivePolicy,
    "eb": EntropyBoundedPolicy, "wino": WinoPolicy,
}


def make_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by name; ``make_policy("adaptive", preset="math", ...)`` uses a preset."""
    if name not in POLICIES:
        raise DecodeInputError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    preset = kwargs.pop("preset", None)
    if preset is not None:
        if name != "adaptive":
            raise DecodeInputError("presets exist only for the adaptive policy")
        return AdaptivePolicy.from_preset(preset, **kwargs)
    return POLICIES[name](**kwargs)
