"""The small diffusion LM: objective, data, a real `cli.py fit` on the debug config (loss goes
down, decode callback logs, checkpoint round-trips), and `cli.py test --method dllm-*` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from toolkit.common.paths import runs_root
from toolkit.dllm.tasks_data import (
    FAMILIES,
    CharTokenizer,
    Problem,
    make_problems,
    score,
    split_seed,
)
from toolkit.dllm.train_module import (
    DiffusionCheckpointError,
    FamilyBatches,
    MaskedDiffusionLM,
    collate,
    diffusion_loss,
    forward_process,
    load_diffusion_checkpoint,
    load_diffusion_checkpoint_with_meta,
    padding_weights,
    sample_t,
)

torch.set_num_threads(1)
# Subprocesses get one thread too: the machine is shared and small.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _line(proc: subprocess.CompletedProcess, prefix: str) -> Path:
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)][-1]
    return Path(line.split(": ", 1)[1].strip())


@pytest.fixture(scope="module")
def debug_run() -> Path:
    return _line(_cli("fit", "--config", "configs/dllm/debug.yaml"), "run directory: ")


@pytest.fixture(scope="module")
def debug_ckpt(debug_run: Path) -> Path:
    return debug_run / "checkpoints" / "last.ckpt"


# ------------------------------------------------------------------------ objective
def _batch() -> dict[str, torch.Tensor]:
    tok = CharTokenizer()
    rows = [(tok.encode_prompt("sum: 1 + 2 ="), tok.encode_answer("3", 8)),
            (tok.encode_prompt("spell backward: dog"), tok.encode_answer("god", 8))]
    return collate(rows, tok.PAD)


def test_forward_process_never_masks_the_prompt():
    b, tok = _batch(), CharTokenizer()
    ids, ans = b["input_ids"], b["answer_mask"]
    noisy, masked = forward_process(ids, ans, torch.ones(2), tok.MASK)
    assert torch.equal(masked, ans)  # t = 1: every answer token, EOS padding included
    assert torch.equal(noisy[~ans], ids[~ans])  # prompt and left padding untouched
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        _, masked = forward_process(ids, ans, torch.rand(2, generator=gen), tok.MASK, gen)
        assert not (masked & ~ans).any()
    noisy, masked = forward_process(ids, ans, torch.zeros(2), tok.MASK)
    assert not masked.any() and torch.equal(noisy, ids)


def test_loss_is_ce_over_masked_weighted_by_one_over_t():
    b = _batch()
    ids, ans = b["input_ids"], b["answer_mask"]
    vocab = CharTokenizer().vocab_size
    t = torch.tensor([0.25, 0.5])
    _, masked = forward_process(ids, ans, torch.tensor([0.6, 0.9]),
                                1, torch.Generator().manual_seed(3))
    logits = torch.zeros(*ids.shape, vocab)  # uniform: every masked CE is log(vocab)
    loss = diffusion_loss(logits, ids, masked, t, ans)
    per_row = masked.sum(-1) * torch.log(torch.tensor(float(vocab))) / t / ans.sum(-1)
    assert loss.item() == pytest.approx(per_row.mean().item(), rel=1e-6)
    # Halving t doubles the loss (the 1/t weight); unmasked positions contribute nothing.
    assert diffusion_loss(logits, ids, masked, t / 2, ans).item() == pytest.approx(
        2 * loss.item(), rel=1e-6)
    bad = logits.clone()
    bad[~masked] = torch.randn_like(bad[~masked]) * 10
    assert diffusion_loss(bad, ids, masked, t, ans).item() == pytest.approx(loss.item())


def test_unweighted_loss_and_stratified_t():
    b = _batch()
    ids, ans = b["input_ids"], b["answer_mask"]
    vocab = CharTokenizer().vocab_size
    _, masked = forward_process(ids, ans, torch.tensor([0.6, 0.9]),
                                1, torch.Generator().manual_seed(3))
    logits = torch.randn(*ids.shape, vocab, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.25, 0.5])
    plain = diffusion_loss(logits, ids, masked, t, ans, weighting="none")
    ce = torch.nn.functional.cross_entropy(logits[masked], ids[masked])
    assert plain.item() == pytest.approx(ce.item(), rel=1e-6)
    assert diffusion_loss(logits, ids, masked, t / 3, ans, "none").item() == pytest.approx(
        plain.item())  # no 1/t factor
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss(logits, ids, masked, t, ans, weighting="sqrt")
    with pytest.raises(ValueError, match="loss_weighting"):
        MaskedDiffusionLM(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32,
                          loss_weighting="sqrt")
    ts = sample_t(8, 1e-3, "cpu", torch.Generator().manual_seed(1), stratified=True)
    # One draw in each eighth of [eps, 1): every batch spans light to heavy masking.
    slots = sorted(((ts - 1e-3) / (1 - 1e-3) * 8).floor().long().tolist())
    assert slots == list(range(8))


def test_padding_weight_down_weights_only_the_eos_padding():
    eos = CharTokenizer().EOS
    targets = torch.tensor([[7, 8, 9, 10, 11, eos, eos, eos], [7, 7, 8, 9, 10, 11, 12, eos]])
    answer = torch.zeros_like(targets, dtype=torch.bool)
    answer[:, 3:] = True  # the first 3 columns are prompt
    w = padding_weights(targets, answer, eos, 0.1)
    # Row 0: the first EOS (column 5) marks the end and keeps 1; the padding after it gets 0.1.
    assert w[0].tolist() == pytest.approx([1, 1, 1, 1, 1, 1, 0.1, 0.1])
    assert w[1].tolist() == [1.0] * 8
    vocab = CharTokenizer().vocab_size
    logits = torch.randn(*targets.shape, vocab, generator=torch.Generator().manual_seed(0))
    masked = answer.clone()
    t = torch.tensor([0.5, 0.5])
    ce = torch.nn.functional.cross_entropy(logits[masked], targets[masked], reduction="none")
    wm = w[masked]
    got = diffusion_loss(logits, targets, masked, t, answer, "none", w)
    assert got.item() == pytest.approx(((wm * ce).sum() / wm.sum()).item(), rel=1e-6)
    ones = torch.ones_like(w)
    assert diffusion_loss(logits, targets, masked, t, answer, "none", ones).item() == \
        pytest.approx(diffusion_loss(logits, targets, masked, t, answer, "none").item())
    with pytest.raises(ValueError, match="padding_weight"):
        MaskedDiffusionLM(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32,
                          padding_weight=1.5)


def test_answers_are_eos_padded_and_aligned():
    tok = CharTokenizer()
    ans = tok.encode_answer("god", 8)
    assert ans[:3] == tok.encode("god") and ans[3:] == [tok.EOS] * 5
    with pytest.raises(ValueError, match="does not fit"):
        tok.encode_answer("x" * 8, 8)  # no room for the EOS
    b = _batch()
    ids, ans_mask = b["input_ids"], b["answer_mask"]
    assert ans_mask.sum(-1).tolist() == [8, 8]
    p = ids.shape[1] - 8
    assert (ids[:, p - 1] == tok.SEP).all()  # left padding: answers start at the same column
    assert (ids[0, :ids.shape[1] - 8 - len(tok.encode_prompt("sum: 1 + 2 ="))] == tok.PAD).all()
    assert tok.decode(ids[1, p:].tolist()) == "god"
    # The model's config carries the tokenizer's special ids.
    m = MaskedDiffusionLM(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32,
                          max_sequence_length=64)
    assert (m.llada_config.mask_token_id, m.llada_config.eos_token_id) == (tok.MASK, tok.EOS)
    assert m.llada_config.vocab_size == tok.vocab_size


def test_family_batches_group_one_family_within_a_token_budget():
    tok = CharTokenizer()
    probs = make_problems("spell_backward", "train", 40, 0) + make_problems("chain_sum",
                                                                             "train", 40, 0)
    data = FamilyBatches(probs, tok, tokens_per_batch=512, seed=0)
    seen = 0
    for i in range(len(data)):
        b = data[i]
        assert b["input_ids"].shape[0] * b["input_ids"].shape[1] <= 512
        assert b["answer_mask"].sum(-1).eq(FAMILIES[b["family"]].gen_length).all()
        seen += b["input_ids"].shape[0]
    assert seen == 80


# ---------------------------------------------------------------------------- data
def test_held_out_never_overlaps_training():
    tok = CharTokenizer()
    assert len({split_seed(0, s) for s in ("train", "val", "test")}) == 3
    for family in FAMILIES:
        n = 10 if family == "word_reversal_long" else 150
        train = {p.prompt for p in make_problems(family, "train", n, 0, tok)}
        val = {p.prompt for p in make_problems(family, "val", 20, 0, tok)}
        test = {p.prompt for p in make_problems(family, "test", 20, 0, tok)}
        assert len(train) == n and not (train & test) and not (train & val) and not (val & test)
    p = Problem("x", "chain_sum", "sum: 1 + 2 =", "3")
    assert score(p, " 3 ") and not score(p, "4")


# ------------------------------------------------------------------- real CLI runs
def test_fit_loss_goes_down_and_callback_logs(debug_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert debug_run.is_relative_to(runs_root() / "fit" / "debug")
    events = EventAccumulator(str(debug_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "val/acc_adaptive", "val/acc_fastdllm",
                "val/nfe_adaptive", "val/nfe_fastdllm"):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    loss = [e.value for e in events.Scalars("train/loss")]
    early, late = sum(loss[:15]) / 15, sum(loss[-15:]) / 15
    assert late < 0.6 * early, (early, late)
    val = [e.value for e in events.Scalars("val/loss")]
    assert val[-1] < val[0] + 1e-6


def test_checkpoint_round_trips(debug_ckpt: Path, tmp_path: Path):
    model, tok = load_diffusion_checkpoint(debug_ckpt)
    assert not model.training and model.config.mask_token_id == tok.MASK
    module = MaskedDiffusionLM.load_from_checkpoint(debug_ckpt, map_location="cpu").eval()
    ids = torch.tensor([tok.encode_prompt("spell backward: cat") + [tok.MASK] * 32])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, module(ids))
    _, _, meta = load_diffusion_checkpoint_with_meta(debug_ckpt)
    assert meta["families"] == {"spell_backward": 32, "chain_sum": 32}
    assert module.trained_families == meta["families"]
    with pytest.raises(DiffusionCheckpointError, match="does not exist"):
        load_diffusion_checkpoint(tmp_path / "missing.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(debug_ckpt.read_bytes()[:1000])
    with pytest.raises(DiffusionCheckpointError, match="not a readable diffusion-LM"):
        load_diffusion_checkpoint(cut)


def test_init_weights_starts_from_a_trained_checkpoint(debug_ckpt: Path):
    dims = {"d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden_size": 64,
            "max_sequence_length": 128}
    trained, _ = load_diffusion_checkpoint(debug_ckpt)
    module = MaskedDiffusionLM(**dims, init_seed=5, init_weights=str(debug_ckpt))
    module._load_initial_weights(str(debug_ckpt))
    for name, value in trained.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value), name
    other = MaskedDiffusionLM(**{**dims, "d_model": 64})
    with pytest.raises(DiffusionCheckpointError, match="architecture or vocabulary differs"):
        other._load_initial_weights(str(debug_ckpt))


@pytest.mark.parametrize("method", ["dllm-adaptive", "dllm-fastdllm"])
def test_test_method_writes_results(method: str, debug_ckpt: Path):
    proc = _cli("test", "--method", method, "--model.init_args.checkpoint", str(debug_ckpt),
                "--data.init_args.n_per_family", "2")
    results = json.loads(_line(proc, "results: ").read_text())
    run = _line(proc, "run directory: ")
    assert run.is_relative_to(runs_root() / "test" / method)
    assert results["method"] == method and results["data"]["n"] == 8
    m = results["metrics"]
    for key in ("accuracy", "nfe", "nfe_full", "nfe_cached", "lower_bound", "tokens_per_s",
                "cache_hit_rate", "mean_block_size", "wall_s"):
        assert set(m[key]) == {"value", "ci95", "n"}, key
    assert m["accuracy"]["n"] == 4  # word/number sorting were not trained: speed-only
    assert sorted(m["speed_only_families"]) == ["number_sorting", "word_sorting"]
    assert results["checkpoint"]["sha256"] and results["policy"]["policy"] == method[5:]
    rows = [json.loads(x) for x in (run / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for r in rows:
        assert r["nfe"] == r["nfe_full"] + r["nfe_cached"] >= r["lower_bound"] >= 1
        for key in ("family", "correct", "answer_tokens", "mean_block_size", "wall_s",
                    "speed_only"):
            assert key in r
    assert (run / "plots" / "nfe_over_answer.png").is_file()
    assert (run / "plots" / "accuracy_vs_nfe.png").is_file()
    assert list(run.glob("events.out.tfevents.*"))


def test_long_context_beyond_training_is_speed_only(debug_ckpt: Path):
    proc = _cli("test", "--method", "dllm-fastdllm", "--model.init_args.checkpoint",
                str(debug_ckpt), "--data.init_args.n_per_family", "1",
                "--data.init_args.long_context", "true")
    results = json.loads(_line(proc, "results: ").read_text())
    lc = results["long_context"]
    assert lc["enabled"] and lc["speed_only"] and lc["gen_lengths"] == {"word_reversal_long": 512}
    assert results["metrics"]["accuracy"]["value"] is None
    assert results["metrics"]["nfe"]["value"] >= 1


def test_missing_default_checkpoint_is_one_line():
    proc = subprocess.run([sys.executable, "cli.py", "test", "--method", "dllm-adaptive",
                           "--model.init_args.checkpoint", "nowhere/model.ckpt"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_decode_callback_restores_mode_and_shards_whole_batches():
    from types import SimpleNamespace

    from toolkit.dllm.callbacks import DiffusionDecodeCallback
    from toolkit.dllm.shards import rank_batches
    from toolkit.dllm.train_module import DiffusionTaskDataModule

    dm = DiffusionTaskDataModule(train_sizes={"spell_backward": 4, "chain_sum": 4}, val_size=3)
    module = MaskedDiffusionLM(d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=32,
                               max_sequence_length=64).train()
    logged: dict[str, float] = {}
    # No Trainer is attached, so record what the callback logs instead.
    module.log = lambda key, value, **_: logged.__setitem__(key, value)  # type: ignore
    cb = DiffusionDecodeCallback(every_n_val_epochs=2, num_problems=3, batch_size=2)
    trainer = SimpleNamespace(sanity_checking=False, global_rank=0, world_size=1, datamodule=dm)
    cb.on_validation_epoch_end(trainer, module)  # 1st validation: skipped (every 2nd)
    assert not logged
    cb.on_validation_epoch_end(trainer, module)
    assert module.training  # the mode it found
    for key in ("val/acc_adaptive", "val/acc_fastdllm", "val/nfe_adaptive", "val/nfe_fastdllm"):
        assert key in logged
    assert logged["val/decode_problems"] == 6
    # Ranks take whole batches (one family each, as one process cuts them), round robin.
    problems = cb._problems(trainer)
    ids = [[[p.id for p in b] for b in rank_batches(problems, 2, r, 2)] for r in (0, 1)]
    assert ids == [[["spell_backward/val/00000", "spell_backward/val/00001"],
                    ["chain_sum/val/00000", "chain_sum/val/00001"]],
                   [["spell_backward/val/00002"], ["chain_sum/val/00002"]]]


# A timing or a wall-clock rate is the only thing allowed to differ between the two runs.
_TIMED = {"wall_s", "tokens_per_s"}


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in _TIMED}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.mark.slow
def test_two_process_test_equals_one_process(debug_ckpt: Path):
    """`test --method dllm-adaptive` over 2 CPU ranks (gloo, the Trainer's ddp_fork: the
    Trainer shards the problems with its DistributedSampler, rank 0 gathers the rows with
    `collect_rows`) gives the same rows and metrics as 1 process, timings aside. 26-45 s
    on the shared 2-core machine, hence slow. (`ddp`, which re-runs the script, cannot work
    here: cli.py clears sys.argv; `ddp_spawn` cannot pickle the CLI class.)"""
    common = ("test", "--method", "dllm-adaptive", "--model.init_args.checkpoint",
              str(debug_ckpt), "--data.init_args.n_per_family", "3")
    out = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        proc = _cli(*common, "--trainer.devices", str(devices), "--trainer.strategy", strategy)
        run = _line(proc, "results: ").parent
        rows = [json.loads(x) for x in (run / "examples.jsonl").read_text().splitlines()]
        results = json.loads((run / "results.json").read_text())
        out[devices] = (rows, results)
    (rows1, res1), (rows2, res2) = out[1], out[2]
    assert len(rows1) == 12 and [r["id"] for r in rows2] == [r["id"] for r in rows1]
    assert _untimed(rows2) == _untimed(rows1)
    assert _untimed(res2["metrics"]) == _untimed(res1["metrics"])
    assert res2["data"] == res1["data"]


SHIPPED = REPO / "checkpoints" / "dllm" / "small" / "model.ckpt"
# What the decode callback logs from the gathered rows (val/decode_s is a wall time).
_CALLBACK_TAGS = ("val/acc_adaptive", "val/acc_fastdllm", "val/nfe_adaptive",
                  "val/nfe_fastdllm", "val/step_acc_adaptive", "val/step_acc_fastdllm",
                  "val/block_adaptive", "val/decode_problems")


def test_decode_callback_over_two_processes_equals_one(tmp_path: Path):
    """`fit` with the decode callback on 2 CPU ranks (ddp_fork, gloo) logs what 1 process logs.

    The shipped model's weights at learning rate 0 (so both runs decode the same weights at
    every validation) give varied rows: right and wrong answers, different NFE. 5 problems a
    family in batches of 2 make 9 batches, 5 on rank 0 and 4 on rank 1; val/decode_problems
    (15) shows that both shards reached the metrics. ~12 s on the idle 2-core machine."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shipped, _, _ = load_diffusion_checkpoint_with_meta(SHIPPED)
    dims = {k: getattr(shipped.config, k) for k in ("d_model", "n_layers", "n_heads",
                                                 "mlp_hidden_size", "max_sequence_length",
                                                 "rope_theta")}
    config = tmp_path / "ddp_callback.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "trainer": {"max_steps": 2, "val_check_interval": 1, "enable_checkpointing": False,
                    "callbacks": [{"class_path": "toolkit.dllm.callbacks.DiffusionDecodeCallback",
                                   "init_args": {"num_problems": 5, "batch_size": 2}}]},
        "model": {"class_path": "toolkit.dllm.train_module.MaskedDiffusionLM",
                  "init_args": {**dims, "lr": 0.0, "init_weights": str(SHIPPED)}},
        "data": {"class_path": "toolkit.dllm.train_module.DiffusionTaskDataModule",
                 "init_args": {"train_sizes": {"spell_backward": 16, "chain_sum": 16,
                                               "worked_sum": 8}, "val_size": 5}}}))
    logged = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        proc = _cli("fit", "--config", "configs/dllm/debug.yaml", "--config", str(config),
                    "--trainer.devices", str(devices), "--trainer.strategy", strategy)
        events = EventAccumulator(str(_line(proc, "run directory: ")))
        events.Reload()
        logged[devices] = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                           for tag in _CALLBACK_TAGS}
    assert logged[2] == logged[1]
    assert [v for _, v in logged[1]["val/decode_problems"]] == [15.0, 15.0]
    assert len({v for tag in ("val/nfe_adaptive", "val/nfe_fastdllm")
                for _, v in logged[1][tag]}) == 2  # the two policies differ


@pytest.mark.parametrize("flags,message", [
    (("--method", "dllm-fastdllm", "--model.init_args.policy_args.block_length", "24"),
     "error: fastdllm: gen_length 32 must be a multiple of block_length 24"),
    (("--method", "dllm-llada", "--model.init_args.policy_args.steps", "7"),
     "error: llada: steps 7 must be a positive multiple of the number of blocks"),
    (("--method", "dllm-adaptive", "--data.init_args.families", "[word_reversal_long]"),
     "error: word_reversal_long: prompt + gen_length 512 reaches"),
])
def test_bad_test_settings_fail_with_one_line_before_decoding(flags, message, debug_ckpt: Path):
    proc = subprocess.run([sys.executable, "cli.py", "test", *flags,
                           "--model.init_args.checkpoint", str(debug_ckpt),
                           "--data.init_args.n_per_family", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(message) and "Traceback" not in proc.stderr
