"""Replay evaluation: baselines on the shipped records through the real CLI, and the math."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, copy_shipped_records
from toolkit.cascade import replay
from toolkit.cascade.features import build_schema
from toolkit.cascade.prompt_table import PromptTable, load_prompt_table

# The CLI replays read a cut of the shipped records of about this many prompts (an equal share
# per task), so the default test run stays a few minutes however large the labelled set grows.
PROMPTS = 360


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    tasks = [p for p in (REPO / "data" / "cascade").iterdir() if list(p.glob("stage*.jsonl"))]
    return copy_shipped_records(tmp_path_factory.mktemp("records"),
                                per_task=PROMPTS // len(tasks))


def _run(method: str, records) -> dict:
    proc = subprocess.run([sys.executable, "cli.py", "test", "--method", method,
                           "--model.data_dir", str(records)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("results: ")][-1]
    path = line.split(": ", 1)[1].strip()
    results = json.loads(open(path).read())
    results["_dir"] = path.rsplit("/", 1)[0]
    return results


@pytest.fixture(scope="module")
def table(records):
    return load_prompt_table(records)


def test_baselines_through_cli_write_results(table, records):
    top, oracle = _run("always-top", records), _run("oracle", records)
    for r in (top, oracle):
        assert r["schema_version"] == 1 and r["data"]["n"] == len(table.ids)
        assert set(r["metrics"]["accuracy"]) == {"value", "ci95", "n"}
        assert len(r["models"]) == 3 and all(len(m["sha256"]) == 64 for m in r["models"])
        rows = open(f"{r['_dir']}/examples.jsonl").read().splitlines()
        assert len(rows) == len(table.ids)
        assert [json.loads(x)["id"] for x in rows] == sorted(table.ids.tolist())
    assert top["metrics"]["relative_cost"]["value"] == pytest.approx(1.0)
    assert oracle["metrics"]["accuracy"]["value"] >= top["metrics"]["accuracy"]["value"]
    assert (REPO / top["_dir"] / "plots" / "quality_vs_cost.png").is_file()


def test_fixed_methods_and_random_cost(table):
    n = np.arange(len(table.ids))
    C = table.cost
    s_or, ran_or = replay.fixed_method("oracle", table)
    s_rt, ran_rt = replay.fixed_method("oracle-route", table)
    c_or, c_rt = replay.charge(ran_or, C), replay.charge(ran_rt, C)
    assert (s_or == s_rt).all() and (c_rt <= c_or + 1e-12).all()
    s2, ran2 = replay.fixed_method("fixed-2stage", table)
    assert np.allclose(replay.charge(ran2, C), C[:, 0] + C[:, -1])
    assert (table.correct[n, s_or] >= table.correct[n, -1]).all()  # never worse than top
    # Latency is the same decisions charged in recorded seconds, not another cost field.
    assert np.allclose(replay.charge(ran2, table.wall_s), table.wall_s[:, 0] + table.wall_s[:, -1])
    runs = [replay.paid(C, replay.random_escalation(table, 0.5, s)).mean() for s in range(20)]
    assert abs(np.mean(runs) - 0.5) < 0.1


def _random_table(seed: int, n: int = 40, L: int = 3) -> PromptTable:
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, L)) < np.linspace(0.2, 0.7, L)).astype(float)
    C = rng.uniform(0.05, 1.0, (n, L)) * np.linspace(0.1, 1.0, L)
    C = C / C[:, -1].mean()  # in mean-top-call units, as ``PromptTable.cost`` is
    schema = build_schema("minimal", L)
    ids = np.array([f"p{i}" for i in range(n)])
    return PromptTable(ids, np.array(["t"] * n), np.array(["train"] * n), ids, correct=Y,
                       agree=Y, flops=C * 1e9, wall_s=C * 10, schema=schema,
                       features=rng.random((n, L, schema.dim)))


@pytest.mark.parametrize("seed", range(5))
def test_oracle_cost_at_matches_brute_force(seed):
    import itertools

    t = _random_table(seed, n=7)
    N, L = t.correct.shape
    for acc in (0.0, 2 / 7, 4 / 7, 1.0):
        best = np.inf
        for route in itertools.product(range(L), repeat=N):  # every routing of every prompt
            idx = np.arange(N)
            if t.correct[idx, route].mean() >= acc - 1e-12:
                best = min(best, t.cost[idx, route].mean())
        got = replay.oracle_cost_at(t, acc)
        assert (np.isnan(got) and best == np.inf) or got == pytest.approx(best)


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_threshold_tuning_matches_a_loop(seed):
    t = _random_table(seed)
    Y, C = t.correct, t.cost
    P = np.random.default_rng(seed + 9).random(Y.shape)
    n = np.arange(len(P))
    for lam in (0.3, 1.0, 5.0):
        loop = min((float((replay.paid(C, s) + lam * (1 - Y[n, s])).mean()), tv)
                   for tv in np.unique(np.r_[P[:, :-1].ravel(), 1.01])
                   for s in [replay.threshold_decisions(P, tv)])
        s = replay.threshold_decisions(P, replay.tune_threshold(P, Y, C, lam))
        assert float((replay.paid(C, s) + lam * (1 - Y[n, s])).mean()) == pytest.approx(
            loop[0])
    for budget in (0.2, 0.5):
        s = replay.threshold_decisions(P, replay.threshold_for_budget(P, Y, C, budget))
        assert replay.paid(C, s).mean() <= budget + 1e-12 or budget < C[:, 0].mean()


def test_budgets_hold_out_of_fold_roughly_and_cascade_is_compared_at_equal_cost(table):
    cv = replay.cv_scores(table, folds=5, seed=0, steps=60)
    for budget in (0.3, 0.6):
        d = replay.at_budget(table, cv, budget)
        # tuned on calibration folds only: the held-out mean cost may miss the budget a little
        assert d["cascade_cost"].mean() <= budget + 0.1
        assert abs(d["random_cost"].mean() - d["cascade_cost"].mean()) < 0.1
        assert len(d["lambdas"]) == 5 and min(d["lambdas"]) > 0


def test_ablation_schemas_are_subsets_of_full():
    from toolkit.cascade.features import build_schema, record_features
    from toolkit.common.io import read_jsonl

    rec = next(iter(read_jsonl(next((REPO / "data" / "cascade" / "humaneval").glob(
        "stage1-*.jsonl")))))
    full = dict(zip(build_schema("full").names, record_features(rec, build_schema("full"))))
    for name in ("topk", "no_entropy", "no_logprobs", "minimal"):
        s = build_schema(name)
        assert set(s.names) <= set(full)
        assert np.allclose(record_features(rec, s), [full[n] for n in s.names])
    assert not any("entropy" in n for n in build_schema("no_entropy").names)
    assert not any("logprob" in n or "margin" in n for n in build_schema("no_logprobs").names)


def test_two_processes_equal_one(records):
    """`test` over 2 CPU ranks (gloo, ddp_fork) writes the same rows and metrics as 1 rank."""
    out = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        proc = subprocess.run([sys.executable, "cli.py", "test", "--method", "oracle-route",
                               "--model.data_dir", str(records), f"--trainer.devices={devices}",
                               f"--trainer.strategy={strategy}", "--data.batch_size=16"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        path = [ln for ln in proc.stdout.splitlines() if ln.startswith("results: ")][-1]
        run_dir = path.split(": ", 1)[1].strip().rsplit("/", 1)[0]
        out[devices] = (json.loads(open(f"{run_dir}/results.json").read())["metrics"],
                        open(f"{run_dir}/examples.jsonl").read())
    assert out[1][1] == out[2][1]
    assert out[1][0] == out[2][0]


@pytest.mark.parametrize("flags,message", [
    (("test", "--method", "always-top", "--model.lam", "-1"), "error: lam must be > 0"),
    (("test", "--method", "cascade", "--model.budgets", "[0.5,-1]"), "error: budgets must be > 0"),
    (("test", "--method", "always-top", "--model.data_dir", "{empty}", "--data.data_dir",
      "{empty}"), "error: no prompt under"),
    (("fit", "--data.data_dir", "{empty}", "--trainer.max_epochs", "1"),
     "error: no train records under"),
])
def test_bad_cascade_input_is_one_line(flags, message, tmp_path):
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "stage0-x.jsonl").write_text("")  # an empty records file
    args = [a.replace("{empty}", str(tmp_path)) for a in flags]
    proc = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


def test_routed_method_through_cli_charges_the_router_and_records_the_goal(table, records):
    """`test --method route-only` on the shipped records and embedding sidecar (few λ, 3
    folds): every routed answer pays the router's forward, and the run records the cost at
    which it comes within 1 point of always-top (null when its curve never does)."""
    proc = subprocess.run([sys.executable, "cli.py", "test", "--method", "route-only",
                           "--model.data_dir", str(records), "--model.sweep", "[1.0, 50.0]",
                           "--model.budgets", "[0.5]", "--model.folds", "3",
                           "--model.peers", "[threshold]"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = [ln for ln in proc.stdout.splitlines() if ln.startswith("results: ")][-1]
    r = json.loads(open(path.split(": ", 1)[1].strip()).read())
    routing = r["routing"]
    assert routing["router_sha256"] and 0 < routing["embed_relative_cost"] < 0.1
    rows = [json.loads(x) for x in open(path.split(": ", 1)[1].strip().replace(
        "results.json", "examples.jsonl"))]
    C = table.cost
    by_id = {i: k for k, i in enumerate(table.ids)}
    for row in rows:  # one stage per prompt (route only) plus the router's forward
        assert row["cost"] > C[by_id[row["id"]], row["stage"]]
    goal = r["metrics"]["cost_at_top_minus_1pt"]["value"]
    curve = r["curves"]["route-only"]
    top = r["comparison"]["always-top"]["accuracy"]["value"]
    ok = [p["cost"] for p in curve if p["accuracy"] >= top - 0.01 - 1e-12]
    assert goal == (min(ok) if ok else None)
    b = routing["budgets"][0]
    assert set(b["methods"]) == {"cascade", "threshold", "random", "route-only"}
    assert b["focus"] == "route-only" and set(b["focus_minus"]) == {"cascade", "threshold",
                                                                     "random"}


def test_leave_one_family_out_never_trains_on_the_held_out_family(table):
    """Outer folds are families; a held-out family's scores equal those of a predictor trained
    directly on the other families' prompts (a naive re-fit), and the nested calibration
    folds are by prompt inside the training families."""
    assert replay.family_of("gsm_symbolic_s3000") == "gsm_symbolic"
    assert replay.family_of("letter_counting") == "letter_counting"
    cv = replay.cv_scores(table, folds=5, seed=0, steps=20, by_family=True)
    fam = np.array([replay.family_of(x) for x in table.tasks])
    assert cv.families == sorted(set(fam)) and len(cv.families) >= 2
    for k, f in enumerate(cv.families):
        held = fam == f
        assert (cv.fold[held] == k).all() and (cv.fold[~held] != k).all()
        model = replay.fit_predictor(table, ~held, seed=0, steps=20)
        from toolkit.cascade.predictor_module import predict_correct

        assert np.allclose(cv.P_test[held], predict_correct(model, table.features[held]))
        # Calibration scores cover the training prompts only, from inner folds by prompt id.
        assert len(cv.P_cal[k]) == int((~held).sum())
    assert len(set(cv.inner.tolist())) == 5


def test_family_report_against_oracle_and_cheapest_stage(table):
    """The leave-one-family-out report, checked by two facts independent of its code: the
    oracle is right whenever any stage is, so no random escalation beats it on any prompt;
    and random escalation matched to the cheapest stage's cost is (almost) always-first."""
    from toolkit.cascade.eval_module import CascadeReplayEval

    ev = CascadeReplayEval(method="cascade", random_seeds=3)
    ev.table = table
    stage, ran = replay.fixed_method("oracle", table)
    rep = ev._families_vs_random(stage, replay.charge(ran, table.cost))
    fam = {replay.family_of(x) for x in table.tasks}
    assert set(rep) == fam and sum(r["n"] for r in rep.values()) == len(table.ids)
    for r in rep.values():
        d = r["minus_random_at_matched_cost"]
        assert d["value"] >= 0 and d["ci95"][0] >= 0
    first = np.zeros(len(table.ids), int)
    rep = ev._families_vs_random(first, table.cost[:, 0])
    for r in rep.values():
        assert abs(r["minus_random_at_matched_cost"]["value"]) < 0.02
