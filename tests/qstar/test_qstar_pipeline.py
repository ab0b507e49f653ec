"""The q* pipeline on tiny models: streaming data, LoRA SFT, test --method qstar, analyze, API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO
from toolkit import cli
from toolkit.common.io import read_jsonl
from toolkit.qstar.stream_datamodule import GenerationStream, QStarStreamDataModule

PROMPTS = [("What is 2 + 3?", "5"), ("def add(a, b):", "x"), ("Name three colors", "red"),
           ("The answer is", "42"), ("What is 4 * 3?", "12"), ("hello there", "hi"),
           ("What is 9 - 1?", "8")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qstar") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "answer": a}) + "\n"
                            for i, (p, a) in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def generated(tiny_lm, tiny_lm_b, prompts_file) -> Path:
    """A small q* generation file (with diagnostics) made by the real `generate` command."""
    out = prompts_file.parent / "gen.jsonl"
    subprocess.run([sys.executable, "cli.py", "generate", "--dataset", str(prompts_file),
                    "--output", str(out), "--model_theta", str(tiny_lm), "--model_t",
                    str(tiny_lm_b), "--batch_size", "4", "--decoding.max_new_tokens", "12",
                    "--decoding.temperature", "1.0", "--decoding.seed", "3"],
                   cwd=REPO, check=True, capture_output=True, text=True)
    assert out.is_file() and out.with_name("gen.diagnostics.jsonl").is_file()
    return out


# ------------------------------------------------------------------ streaming
def test_stream_every_row_once_over_ranks_and_workers(generated):
    seen = []
    for rank in range(2):
        ds = GenerationStream([generated, generated], rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda x: x)
        seen += [(it["file"], it["sample_idx"], i) for i, it in enumerate(loader)]
    keys = sorted((f, s) for f, s, _ in seen)
    # The same file twice: every (position) once, i.e. each sample exactly twice in total.
    assert len(keys) == 2 * len(PROMPTS)
    assert sorted(s for _, s in keys) == sorted(list(range(len(PROMPTS))) * 2)
    assert not hasattr(ds, "__len__") or not callable(getattr(type(ds), "__len__", None))


def test_stream_batches_mask_prompt_and_carry_diagnostics(tiny_lm, generated):
    dm = QStarStreamDataModule([str(generated)], model=str(tiny_lm), val_every=3, batch_size=3)
    train = [b for b in dm.train_dataloader()]
    val = [b for b in dm.val_dataloader()]
    idx = sorted(torch.cat([b["sample_idx"] for b in train + val]).tolist())
    assert idx == list(range(len(PROMPTS)))
    assert all(i % 3 == 0 for b in val for i in b["sample_idx"].tolist())
    b = train[0]
    tok = dm.tokenizer
    row = next(r for r in read_jsonl(generated) if r["sample_idx"] == int(b["sample_idx"][0]))
    prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False,
                                     add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert (b["labels"][0, :n_prompt] == -100).all()
    n = int(b["attention_mask"][0].sum())
    assert (b["labels"][0, n_prompt:n] == b["input_ids"][0, n_prompt:n]).all()
    assert (b["labels"][0, n:] == -100).all()
    for key in ("alpha_mean", "ess_ratio_mean", "kl_theta_mean", "kl_t_mean"):
        assert torch.isfinite(b[key]).all()
    assert torch.isfinite(b["log_weight"]).all()  # sampled at temperature 1: weights written


def test_answers_cut_at_max_new_tokens_do_not_learn_to_end_the_turn(tiny_lm, generated):
    from toolkit.models.loading import load_tokenizer, resolve
    from toolkit.qstar.stream_datamodule import tokenize_chat

    rows = list(read_jsonl(generated))
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    tok = load_tokenizer(resolve(str(tiny_lm)))
    msgs = [{"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 is 5 because"}]
    ids, labels = tokenize_chat(tok, msgs, 512)
    cut_ids, cut_labels = tokenize_chat(tok, msgs, 512, truncated=True)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in [t for t in labels if t != -100]
    assert end not in [t for t in cut_labels if t != -100]
    assert ids[:len(cut_ids)] == cut_ids and len(cut_ids) < len(ids)


# ------------------------------------------------------------------------ SFT
def test_batch_weights_normalised_clipped_and_stable():
    from toolkit.qstar.sft_module import batch_weights

    w = batch_weights(torch.tensor([1000.0, 0.0, 0.0, 0.0]), clip=2.0)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    assert torch.allclose(w, torch.tensor([0.5, 1 / 6, 1 / 6, 1 / 6]))
    w = batch_weights(torch.tensor([0.0, 2.0, -1.0, 0.5, 1.0]), clip=1.5)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and w.max() <= 0.3 + 1e-6
    assert w[1] == w.max() and w[2] == w.min()
    assert torch.allclose(batch_weights(torch.zeros(4), 5.0), torch.full((4,), 0.25))


def test_lora_fit_changes_only_lora_and_logs_ess(tiny_lm, generated, tmp_path):
    from transformers import AutoModelForCausalLM

    weighted = tmp_path / "gen.jsonl"
    weighted.write_text(generated.read_text())
    rng = np.random.default_rng(0)
    diag = [dict(r, log_weight=float(rng.normal() * 3))
            for r in read_jsonl(generated.with_name("gen.diagnostics.jsonl"))]
    (tmp_path / "gen.diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diag))
    result = cli.main(["fit", "--config", str(REPO / "configs/qstar/debug_sft.yaml"),
                       "--model.init_args.model", str(tiny_lm),
                       "--model.init_args.importance_weighting", "true",
                       "--data.init_args.model", str(tiny_lm),
                       "--data.init_args.files", json.dumps([str(weighted)])])
    module, trainer = result.model, result.trainer
    assert trainer.global_step > 0
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert 1.0 <= float(metrics["train/batch_ess"]) <= 2.0
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).state_dict()
    changed_lora = 0
    for name, p in module.lm.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            changed_lora += int(name.endswith("lora_B") and p.abs().sum() > 0)
        else:
            assert not p.requires_grad
            key = name.replace(".base.", ".")
            assert torch.equal(p.detach(), base[key]), name
    assert changed_lora == len(module.wrapped) > 0
    unweighted = cli.main(["fit", "--config", str(REPO / "configs/qstar/debug_sft.yaml"),
                           "--model.init_args.model", str(tiny_lm),
                           "--data.init_args.model", str(tiny_lm),
                           "--data.init_args.files", json.dumps([str(generated)]),
                           "--trainer.max_steps", "1"])
    assert "train/batch_ess" not in unweighted.trainer.callback_metrics
    ckpt = torch.load(Path(trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    # `merge` folds the LoRA update into a plain transformers folder with the same outputs.
    merged = Path(cli.main(["merge", "--checkpoint", str(Path(trainer.log_dir) / "checkpoints"
                                                         / "last.ckpt"),
                            "--output", str(tmp_path / "merged")]))
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    module.lm.eval()
    with torch.no_grad():
        want = module.lm(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(base_logits(tiny_lm, ids), want, atol=1e-3)
    assert (merged / "tokenizer_config.json").is_file()


def base_logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path))(input_ids=ids).logits


def test_merge_refuses_a_missing_or_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, foreign)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    for path, msg in ((tmp_path / "none.ckpt", "no checkpoint file"),
                      (foreign, "not a q* SFT"), (text, "is not a checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["merge", "--checkpoint", str(path), "--output", str(tmp_path / "m")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and msg in err and "Traceback" not in err


# ---------------------------------------------------------------- test --method
def _qstar_test(method, tiny_lm, tiny_lm_b, prompts_file):
    result = cli.main(["test", "--method", method,
                       "--model.init_args.model_theta", str(tiny_lm),
                       "--model.init_args.model_t", str(tiny_lm_b),
                       "--model.init_args.decoding.max_new_tokens", "6",
                       "--data.init_args.task", str(prompts_file),
                       "--data.init_args.limit", "5", "--data.init_args.batch_size", "3"])
    run_dir = Path(result.trainer.log_dir)
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_weighted_fit_refuses_samples_without_log_weight(tiny_lm, generated, tmp_path, capsys):
    unweighted = tmp_path / "gen.jsonl"
    unweighted.write_text(generated.read_text())
    diag = [{k: v for k, v in r.items() if not k.startswith("log_weight")}
            for r in read_jsonl(generated.with_name("gen.diagnostics.jsonl"))]
    (tmp_path / "gen.diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diag))
    with pytest.raises(SystemExit) as exit_info:  # one line on stderr, no traceback
        cli.main(["fit", "--config", str(REPO / "configs/qstar/debug_sft.yaml"),
                  "--model.init_args.model", str(tiny_lm),
                  "--model.init_args.importance_weighting", "true",
                  "--data.init_args.model", str(tiny_lm),
                  "--data.init_args.files", json.dumps([str(unweighted)])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs a log_weight for every sample" in err
    assert "Traceback" not in err


def test_test_method_qstar_writes_results(tiny_lm, tiny_lm_b, prompts_file):
    run_dir, res = _qstar_test("qstar", tiny_lm, tiny_lm_b, prompts_file)
    assert res["method"] == "qstar" and res["data"]["n"] == 5
    m = res["metrics"]
    for key in ("accuracy", "alpha_mean", "ess_ratio_mean", "kl_theta_mean", "kl_t_mean",
                "frac_meets_ess", "frac_meets_kl", "frac_meets_alpha", "tokens_per_s"):
        assert key in m and m[key]["n"] == 5, key
    assert 0 <= m["alpha_mean"]["value"] <= 1 and m["tokens_per_s"]["value"] > 0
    # kl_symmetry balances the two KLs on every token.
    assert m["frac_meets_kl"]["value"] == 1.0
    assert abs(m["kl_theta_mean"]["value"] - m["kl_t_mean"]["value"]) < 1e-4
    rows = list(read_jsonl(run_dir / "examples.jsonl"))
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert {"id", "correct", "tokens", "wall", "alpha_mean", "frac_meets_alpha"} <= set(rows[0])
    assert (run_dir / "plots" / "alpha_kl.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.rglob("*"))


@pytest.mark.parametrize("method", ["qstar-fixed", "qstar-entropy", "base", "teacher"])
def test_comparison_methods_run(tiny_lm, tiny_lm_b, prompts_file, method):
    _, res = _qstar_test(method, tiny_lm, tiny_lm_b, prompts_file)
    m = res["metrics"]
    assert res["method"] == method and m["accuracy"]["n"] == 5
    if method in ("base", "teacher"):  # one model: nothing mixed, no mixture diagnostics
        assert "alpha_mean" not in m and len(res["models"]) == 1
        assert res["models"][0]["path"] == str(tiny_lm if method == "base" else tiny_lm_b)
    else:
        assert len(res["models"]) == 2 and "frac_meets_ess" in m
    if method == "qstar-fixed":
        assert m["alpha_mean"]["value"] == pytest.approx(0.5)


# -------------------------------------------------------------------- analyze
def test_analyze_compares_files_and_checks_conditions(generated, tmp_path, capsys):
    diag = generated.with_name("gen.diagnostics.jsonl")
    other = tmp_path / "other.diagnostics.jsonl"
    other.write_text(diag.read_text())
    cli.main(["analyze", "--files", json.dumps([str(diag), str(other)]),
              "--out_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "| statistic |" in printed and "kl_symmetry (gen.diagnostics.jsonl)" in printed
    assert "other.diagnostics.jsonl" in printed and "α in [0.2, 0.8]" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    first = summary["kl_symmetry (gen.diagnostics.jsonl)"]
    assert first["samples"] == len(PROMPTS)
    assert first["samples_meeting"]["kl"] == 1.0 and first["tokens_meeting"]["kl"] == 1.0
    assert (tmp_path / "out" / "plots" / "distributions.png").is_file()
    rows = list(read_jsonl(diag))
    cut = np.mean([r["tokens"] >= 12 for r in rows])  # the fixture's max_new_tokens
    assert first["at_token_limit"] == pytest.approx(cut)
    assert "at_token_limit" not in summary["other.diagnostics.jsonl"]  # no meta beside it
    lw = np.array([r["log_weight"] for r in rows])
    w = np.exp(lw - lw.max()) / np.exp(lw - lw.max()).sum()
    stats = first["log_weight"]
    assert stats["mean"] == pytest.approx(lw.mean())
    assert stats["per_token"] == pytest.approx(lw.sum() / sum(r["tokens"] for r in rows))
    assert stats["ess_fraction"] == pytest.approx(1 / (w ** 2).sum() / len(rows))
    assert 1 / len(rows) <= stats["ess_fraction"] <= 1


@pytest.mark.parametrize("content,message", [(None, "no such file"), ("", "empty file"),
                                             ('{"a": 1}\n', "not a q* diagnostics file")])
def test_analyze_bad_files_fail_in_one_line(tmp_path, content, message, capsys):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as info:
        cli.main(["analyze", "--files", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------- seed API
def test_seed_api_generates_texts_and_diagnostics(tiny_lm, tiny_lm_b):
    from toolkit.qstar.seed_api import create_optimal_sampling_model

    model = create_optimal_sampling_model(str(tiny_lm), str(tiny_lm_b), "entropy")
    out = model.generate(["hello there", "The answer is"], max_new_tokens=5, seed=1,
                         batch_size=2)
    again = model.generate(["hello there", "The answer is"], max_new_tokens=5, seed=1)
    assert out["texts"] == again["texts"] and len(out["diagnostics"]) == 2
    d = out["diagnostics"][0]
    assert 0 <= d["alpha_mean"] <= 1 and len(d["alpha"]) == d["tokens"]
    assert {"ess_ratio_mean", "kl_theta_mean", "kl_t_mean", "frac_meets_alpha"} <= set(d)


def test_two_processes_equal_one(tiny_lm, tiny_lm_b, prompts_file):
    """`test --method qstar` over 2 CPU ranks (gloo, ddp_fork) gives the same rows and metrics
    as 1 process, wall-clock fields aside (each rank decodes its own shard). Batch size 1:
    with larger batches the ranks' batches hold other prompts, and fp32 results depend on the
    padding around a prompt in the last bits (measured: KL means differ by ~1e-9)."""
    timed = {"wall", "wall_share", "tokens_per_s"}

    def untimed(obj):
        if isinstance(obj, dict):
            return {k: untimed(v) for k, v in obj.items() if k not in timed}
        return [untimed(v) for v in obj] if isinstance(obj, list) else obj

    out = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        proc = subprocess.run(
            [sys.executable, "cli.py", "test", "--method", "qstar",
             "--model.init_args.model_theta", str(tiny_lm),
             "--model.init_args.model_t", str(tiny_lm_b),
             "--model.init_args.decoding.max_new_tokens", "6",
             "--data.init_args.task", str(prompts_file), "--data.init_args.limit", "5",
             "--data.init_args.batch_size", "1", f"--trainer.devices={devices}",
             f"--trainer.strategy={strategy}"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory: ")][-1]
        run = Path(line.split(": ", 1)[1].strip())
        out[devices] = (list(read_jsonl(run / "examples.jsonl")),
                        json.loads((run / "results.json").read_text()))
    (rows1, res1), (rows2, res2) = out[1], out[2]
    assert len(rows1) == 5 and untimed(rows2) == untimed(rows1)
    assert untimed(res2["metrics"]) == untimed(res1["metrics"])


def test_resume_dir_keeps_rows_and_skips_done_batches(tiny_lm, tiny_lm_b, prompts_file,
                                                      tmp_path):
    args = ["test", "--method", "qstar-entropy",
            "--model.init_args.model_theta", str(tiny_lm),
            "--model.init_args.model_t", str(tiny_lm_b),
            "--model.init_args.decoding.max_new_tokens", "6",
            "--model.init_args.resume_dir", str(tmp_path),
            "--data.init_args.task", str(prompts_file), "--data.init_args.limit", "4",
            "--data.init_args.batch_size", "2"]
    first = Path(cli.main(args).trainer.log_dir)
    store = tmp_path / "qstar-entropy.rows.jsonl"
    lines = store.read_text().splitlines()
    assert len(lines) == 4
    # Drop the second batch, as a kill after the first batch would have left the file.
    store.write_text("\n".join(lines[:2]) + "\n")
    second = Path(cli.main(args).trainer.log_dir)
    stored = store.read_text().splitlines()
    assert stored[:2] == lines[:2] and len(stored) == 4
    untimed = {"wall", "wall_share"}
    rows = [[{k: v for k, v in r.items() if k not in untimed}
             for r in read_jsonl(d / "examples.jsonl")] for d in (first, second)]
    assert rows[0] == rows[1]
    # A changed configuration is refused instead of mixing rows.
    with pytest.raises(SystemExit):
        cli.main([*args, "--model.init_args.decoding.max_new_tokens", "7"])
