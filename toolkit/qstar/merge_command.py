"""``python cli.py merge``: fold a q* SFT checkpoint's LoRA update into its base model.

Kept apart from :mod:`toolkit.qstar.sft_module` so that ``merge --help`` and argument errors
import neither torch nor Lightning (the CLI imports this module to build the help); the module
and torch are imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path


def merge_checkpoint(checkpoint: str, output: str) -> str:
    """Write π_θ with an SFT checkpoint's LoRA update merged in, as a transformers folder.

    The folder (weights, config, tokenizer) works wherever a model is taken: ``generate
    --model``, ``test --method base --model.init_args.model_theta``, a cascade stage.

    Args:
        checkpoint: a ``.ckpt`` written by ``fit --config configs/qstar/sft.yaml``.
        output: the folder to write (replaced whole; written beside it, then renamed).
    """
    import inspect
    import shutil
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from toolkit.models.loading import resolve
    from toolkit.qstar.sft_module import QStarSFTModule, SFTCheckpointError, merge_lora

    ckpt_path = Path(checkpoint)
    if not ckpt_path.is_file():
        raise SFTCheckpointError(f"no checkpoint file at {checkpoint}")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a torch file at all: say so in one line
        raise SFTCheckpointError(f"{checkpoint} is not a checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "lora_r" not in ckpt.get(
            "hyper_parameters", {}):
        raise SFTCheckpointError(f"{checkpoint} is not a q* SFT (QStarSFTModule) checkpoint")
    known = inspect.signature(QStarSFTModule).parameters  # LightningCLI adds _class_path
    module = QStarSFTModule(**{k: v for k, v in ckpt["hyper_parameters"].items() if k in known})
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(ckpt["state_dict"]) != trainable:
        raise SFTCheckpointError(
            f"{checkpoint} does not fit {module.hparams.model}: its tensors are not the "
            "module's trainable ones (another base model or LoRA setting?)")
    module.load_state_dict(ckpt["state_dict"], strict=False)
    lm = merge_lora(module.lm).eval()
    lm.config.use_cache = True
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lm.save_pretrained(tmp)
        # the base's tokenizer as it is (load_tokenizer would save its padding tweaks too)
        AutoTokenizer.from_pretrained(resolve(module.hparams.model).path).save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {checkpoint} into {out}")
    return str(out)
