"""When to stop the cascade: optimal stopping by backward induction on calibration data.

What is known when. Before any stage runs, only the prompt is known (its *group*, e.g. its
task: a prompt-only feature). After stage k runs, its answer's predicted acceptance p_k is
known, and so are the p's of the stages already run. Nothing about later stages is known:
their value is an expectation over calibration prompts that looked the same so far.

"Looked the same" = the same *history*: the stages run so far and the bin of each one's p
(bins are quantiles of p on the calibration data). Stage answers are correlated (a prompt that
beats the 0.5B model often beats the 1.5B one too), so conditioning on the history, not only on
the current p, matters.

The objective, per prompt: total cost of the stages run + λ · (1 − correct(returned answer)),
costs in units of one top-stage call (so λ = 1 means "a wrong answer is as bad as one extra
top-stage call"). The policy is solved exactly on the empirical calibration distribution by
dynamic programming from the last stage back (backward induction):

    value(after stage k, history h) = min( λ · (1 − acc(h)),                      stop
                                           min_{j > k} E_h[c_j + value(after j)] )  go to j

and a pre-generation *entry* decision per prompt group picks the first stage to run, so a
stage that is rarely worth its cost for a group is skipped; each group gets its own
programme and its own decision table. With L stages a decision is a table lookup along at
most L states (O(L)). ``acc(h)`` can be shrunk toward a
prior mean with a Beta(α0, β0) prior (the seed's risk adjustment), which matters for histories
with few calibration prompts.

Budgets. Larger λ escalates more, so mean cost grows with λ, but in steps: a deterministic
policy's cost jumps when a decision flips, and the largest λ under a budget can leave much of
it unused (a two-stage policy may cost either a small fraction or all of the budget, nothing
between). The optimum of the budget-constrained problem randomises between the two policies
that bracket the budget (``MixedPolicy``); each prompt's side is fixed by a hash of the prompt,
so replays and live runs are reproducible and agree.

The seed's own rule is kept as ``optimal_stopping_rule`` for comparison; see SPEC §A for why it
never escalates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.common.errors import UserError

History = tuple[tuple[int, int], ...]  # ((stage, bin of its p), ...)


class PolicyFormatError(UserError, ValueError):
    """A saved policy this version cannot read."""


def optimal_stopping_rule(p: list[float], C: list[float], lam: float) -> int:
    """The seed's rule, verbatim in spirit: J_i = min(c_i + λ(1 − p̄_i), c_i + J_{i+1}).

    Kept only for comparison. p̄_i = Π_{j≤i} p_j can only fall with i, so under this objective
    escalating never pays and it stops at the first stage (SPEC §A).
    """
    L = len(p)
    pbar = np.cumprod(p)
    J = np.zeros(L + 1)
    J[L - 1] = C[L - 1] + lam * (1 - pbar[L - 1])
    stop_at = L - 1
    for i in range(L - 2, -1, -1):
        stop, go = C[i] + lam * (1 - pbar[i]), C[i] + J[i + 1]
        J[i] = min(stop, go)
    for i in range(L):
        if C[i] + lam * (1 - pbar[i]) <= C[i] + J[i + 1] or i == L - 1:
            stop_at = i
            break
    return stop_at


@dataclass
class Decision:
    action: str  # "stop" | "go"
    next_stage: int | None
    stop_value: float
    go_value: float
    support: int  # calibration prompts behind this decision


@dataclass
class StoppingPolicy:
    """A fitted policy: per prompt group, an entry stage and a decision per history.

    Fit with ``fit_policy``. ``bin_edges[k]`` are the inner quantile edges of stage k's p.
    ``decisions[group][history]`` is the decision after the history's last stage: each group
    has its own table, because the same history can call for different actions in different
    groups (their later stages' accuracies differ). The group ``""`` holds the policy for
    prompts whose group is unknown (e.g. a request to the server): when the policy is fitted
    with groups, that table is solved on all calibration prompts pooled.
    """

    lam: float
    bin_edges: list[np.ndarray]
    entry: dict[str, int]
    decisions: dict[str, dict[History, Decision]]
    stage_fallback: dict[int, Decision]
    risk_prior: tuple[float, float] | None = None
    expected_value: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)
    escalate: bool = True  # False: answer with the entry stage (a route-only policy)
    final_groups: tuple[str, ...] = ()  # groups whose entry stage's answer is final

    @property
    def num_stages(self) -> int:
        return len(self.bin_edges)

    def bin_of(self, stage: int, p: float) -> int:
        return int(np.searchsorted(self.bin_edges[stage], p, side="right"))

    def first_stage(self, group: str = "") -> int:
        return self.entry.get(group, self.entry.get("", 0))

    def for_key(self, key: str) -> StoppingPolicy:
        """The deterministic policy for one prompt (itself; see ``MixedPolicy``)."""
        return self

    def decide(self, stage: int, history: History, group: str = "") -> Decision:
        """What to do after ``stage`` ran; ``history`` already includes (stage, its bin)."""
        if stage == self.num_stages - 1 or not self.escalate or group in self.final_groups:
            return Decision("stop", None, float("nan"), float("inf"), 0)
        table = self.decisions.get(group, self.decisions.get("", {}))
        return table.get(history) or self.stage_fallback[stage]

    def run(self, p: np.ndarray, group: str = "") -> tuple[int, list[int]]:
        """Replay one prompt: p[k] = predicted acceptance of stage k's answer (computed lazily
        by the caller in live mode). Returns (answering stage, stages run)."""
        k, hist, ran = self.first_stage(group), (), []
        while True:
            ran.append(k)
            hist = (*hist, (k, self.bin_of(k, float(p[k]))))
            d = self.decide(k, hist, group)
            if d.action == "stop":
                return k, ran
            k = d.next_stage


def prompt_key(prompt: str | list[dict[str, Any]]) -> str:
    """The key that fixes a prompt's side of a ``MixedPolicy``: the prompt text (chat messages
    as canonical JSON), so replay on a record and a live request with the same prompt agree."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def key_uniform(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` (sha256), uniform over keys."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


@dataclass
class MixedPolicy:
    """Randomise between two deterministic policies: ``high`` for a share ``q`` of prompts.

    ``calibrate_lambda(..., mix=True)`` builds it from the two λ that bracket a budget, with
    ``q`` chosen so the expected mean cost equals the budget (see the module docstring). The
    draw is ``key_uniform(prompt_key(prompt)) < q``: fixed per prompt, independent of order.
    """

    low: StoppingPolicy
    high: StoppingPolicy
    q: float

    @property
    def num_stages(self) -> int:
        return self.low.num_stages

    @property
    def lam(self) -> float:
        """λ of the cheaper policy (the largest deterministic λ within the budget)."""
        return self.low.lam

    def for_key(self, key: str) -> StoppingPolicy:
        return self.high if key_uniform(key) < self.q else self.low


AnyPolicy = StoppingPolicy | MixedPolicy


def _adjusted_acc(y: np.ndarray, prior: tuple[float, float] | None) -> float:
    """The seed's Beta-prior shrinkage (n·ȳ + α0)/(n + α0 + β0); plain ȳ without a prior.

    n is the number of calibration prompts behind the estimate, so histories with little
    evidence are pulled toward the prior mean α0/(α0 + β0) and the policy acts more cautiously.
    """
    if prior is None:
        return float(y.mean())
    a0, b0 = prior
    return float((y.sum() + a0) / (len(y) + a0 + b0))


def fit_policy(P: np.ndarray, Y: np.ndarray, C: np.ndarray, lam: float, n_bins: int = 3,
               groups: np.ndarray | None = None, risk_prior: tuple[float, float] | None = None,
               allow_skip: bool = True, escalate: bool = True,
               shared_decisions: bool = False, final_entry: bool = False,
               crossfit: int = 0) -> StoppingPolicy:
    """Solve the stopping policy on calibration prompts.

    Args:
        P: [N, L] predicted acceptance of each stage's answer for each prompt.
        Y: [N, L] actual acceptance (1 correct / 0 wrong) of each stage's answer.
        C: [N, L] cost of running each stage on each prompt (top-stage-call units).
        lam: λ > 0, the price of a wrong answer in cost units.
        n_bins: quantile bins of each stage's p.
        groups: [N] prompt-only group of each prompt (entry decision per group).
        risk_prior: (α0, β0) Beta prior for the accuracies of histories, or None.
        allow_skip: let the entry decision skip leading stages.
        escalate: let a drafted answer be escalated; False makes the entry decision the only
            one (route only: each group answers with the stage that minimises its mean
            cost + λ · (1 − accuracy)).
        shared_decisions: one post-draft decision table for every group, solved on all
            prompts pooled; only the entry stage is chosen per group (from the pooled
            policy's realised values in the group). Fewer parameters when groups are small.
        final_entry: with ``shared_decisions``, a group may also answer with its entry stage
            and never escalate (the pooled table's post-draft decisions may not suit it); so
            the policy class contains the route-only policy on the same groups.
        crossfit: with ``final_entry``, judge "follow the pooled table" by its value on
            prompts the table was not solved on (``crossfit`` parts, each scored by a table
            solved on the others; a history that table never saw stops). In-sample, a table
            fitted to the same prompts always looks better than answering at once, so the
            choice escalates too often; 0 or 1 = in-sample.
    """
    if lam <= 0 or not np.isfinite(lam):
        raise ValueError(f"lambda must be a positive number, got {lam}")
    P, Y, C = (np.asarray(a, dtype=np.float64) for a in (P, Y, C))
    N, L = P.shape
    if N == 0:
        raise ValueError("no calibration prompts to fit the stopping policy on")
    if not (np.isfinite(P).all() and np.isfinite(Y).all() and np.isfinite(C).all()):
        raise ValueError("calibration arrays contain NaN or inf")
    edges = [np.unique(np.quantile(P[:, k], np.linspace(0, 1, n_bins + 1)[1:-1]))
             for k in range(L)]
    bins = np.stack([np.searchsorted(edges[k], P[:, k], side="right") for k in range(L)], 1)
    # Per stage: (action, target, stop value, go value, support) of every solved history, for
    # the fallback of histories never seen in calibration.
    fallback_stats: dict[int, list[tuple[str, int | None, float, float, int]]] = {}

    def solve(idx: np.ndarray, table: dict[History, Decision]) -> dict[int, np.ndarray]:
        """Backward induction on the prompts ``idx`` (one group), filling ``table``; returns,
        for each possible entry stage, the realised value of each prompt of ``idx``."""

        def after(k: int, hist: History, sub: np.ndarray) -> np.ndarray:
            """Realised value of each prompt in ``sub`` after stage k ran, acting optimally."""
            stop_real = lam * (1.0 - Y[sub, k])
            if k == L - 1 or not escalate:
                return stop_real
            stop_val = lam * (1.0 - _adjusted_acc(Y[sub, k], risk_prior))
            best = ("stop", None, stop_val, stop_real)
            best_go = float("inf")
            for j in range(k + 1, L):
                real = C[sub, j] + run(j, hist, sub)
                val = float(real.mean())
                best_go = min(best_go, val)
                if val < best[2]:
                    best = ("go", j, val, real)
            table[hist] = Decision(best[0], best[1], stop_val, best_go, len(sub))
            fallback_stats.setdefault(k, []).append(
                (best[0], best[1], stop_val, best_go, len(sub)))
            return best[3]

        def run(k: int, hist: History, sub: np.ndarray) -> np.ndarray:
            out = np.empty(len(sub))
            for b in np.unique(bins[sub, k]):
                sel = bins[sub, k] == b
                out[sel] = after(k, (*hist, (k, int(b))), sub[sel])
            return out

        starts = range(L) if allow_skip else range(1)
        return {s: C[idx, s] + run(s, (), idx) for s in starts}

    def best_entry(values: dict[int, np.ndarray], rows: np.ndarray | slice) -> tuple[int, float]:
        sums = {s: float(v[rows].sum()) for s, v in values.items()}
        first = min(sums, key=sums.get)
        return first, sums[first]

    groups = np.asarray([""] * N if groups is None else groups).astype(str)
    entry: dict[str, int] = {}
    decisions: dict[str, dict[History, Decision]] = {}
    total = 0.0
    final: list[str] = []
    if shared_decisions:  # one pooled table; the entry per group from its realised values
        decisions[""] = {}
        pooled = solve(np.arange(N), decisions[""])
        entry[""], _ = best_entry(pooled, slice(None))
        # Answering with the entry stage, whatever its draft looks like (route only).
        at_once = {s: C[:, s] + lam * (1.0 - Y[:, s]) for s in pooled}
        judged = pooled
        if final_entry and escalate and crossfit > 1:
            judged = _crossfit_values(solve, bins, Y, C, lam, list(pooled), crossfit,
                                      fallback_stats)
        for g in np.unique(groups):
            m = groups == g
            entry[str(g)], value = best_entry(judged, m)
            if final_entry and escalate:
                s, v = best_entry(at_once, m)
                if v < value:
                    entry[str(g)], value = s, v
                    final.append(str(g))
            # the value the policy realises on these prompts (in-sample, as everywhere)
            total += float((at_once if str(g) in final else pooled)[entry[str(g)]][m].sum())
    else:
        for g in np.unique(groups):
            decisions[str(g)] = {}
            idx = np.flatnonzero(groups == g)
            entry[str(g)], value = best_entry(solve(idx, decisions[str(g)]), slice(None))
            total += value
        if "" not in entry:  # prompts of unknown group: the policy solved on all prompts pooled
            decisions[""] = {}
            entry[""], _ = best_entry(solve(np.arange(N), decisions[""]), slice(None))
    # Fallback for histories never seen in calibration: the support-weighted average choice.
    stage_fallback = {}
    for k, rows in fallback_stats.items():
        n = sum(r[4] for r in rows)
        stop_v = sum(r[2] * r[4] for r in rows) / n
        go_v = sum(r[3] * r[4] for r in rows) / n
        targets = [r[1] for r in rows if r[1] is not None]
        nxt = max(set(targets), key=targets.count) if targets else k + 1
        stage_fallback[k] = Decision("stop" if stop_v <= go_v else "go",
                                     None if stop_v <= go_v else nxt, stop_v, go_v, n)
    for k in range(L - 1):
        stage_fallback.setdefault(k, Decision("go", k + 1, float("nan"), float("nan"), 0))
    return StoppingPolicy(lam, edges, entry, decisions, stage_fallback, risk_prior, total / N,
                          escalate=escalate, final_groups=tuple(final))


def _crossfit_values(solve: Callable[..., dict[int, np.ndarray]], bins: np.ndarray,
                     Y: np.ndarray, C: np.ndarray, lam: float, starts: list[int], parts: int,
                     fallback_stats: dict[int, list[Any]]) -> dict[int, np.ndarray]:
    """Per entry stage, each prompt's realised value under a pooled table solved without it
    (``parts`` interleaved parts); a history the table never saw stops there."""
    N, L = Y.shape
    part = np.arange(N) % parts
    out = {s: np.empty(N) for s in starts}
    saved = {k: list(v) for k, v in fallback_stats.items()}
    for f in range(parts):
        table: dict[History, Decision] = {}
        solve(np.flatnonzero(part != f), table)
        for i in np.flatnonzero(part == f):
            for s in starts:
                k, hist, value = s, (), C[i, s]
                while True:
                    hist = (*hist, (k, int(bins[i, k])))
                    d = table.get(hist) if k < L - 1 else None
                    if d is None or d.action == "stop":
                        out[s][i] = value + lam * (1.0 - Y[i, k])
                        break
                    k = d.next_stage
                    value += C[i, k]
    fallback_stats.clear()  # the parts' tables are not the policy's: keep its own statistics
    fallback_stats.update(saved)
    return out


def evaluate(policy: AnyPolicy, P: np.ndarray, Y: np.ndarray, C: np.ndarray,
             groups: np.ndarray | None = None, keys: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
    """Replay a policy on prompts: answering stage, cost paid, correctness and the stages
    run ([N, L] bool), per prompt.

    ``keys`` (``prompt_key`` of each prompt) are needed for a ``MixedPolicy``.
    """
    N = len(P)
    groups = np.asarray([""] * N if groups is None else groups)
    if isinstance(policy, MixedPolicy) and keys is None:
        raise ValueError("evaluating a mixed policy needs each prompt's key")
    stop, cost, correct = np.empty(N, int), np.empty(N), np.empty(N)
    ran_mask = np.zeros(P.shape, bool)
    for i in range(N):
        pol = policy if keys is None else policy.for_key(str(keys[i]))
        k, ran = pol.run(P[i], str(groups[i]))
        stop[i], cost[i], correct[i] = k, C[i, ran].sum(), Y[i, k]
        ran_mask[i, ran] = True
    return {"stage": stop, "cost": cost, "correct": correct, "ran": ran_mask}


def calibrate_lambda(P: np.ndarray, Y: np.ndarray, C: np.ndarray, budget: float,
                     metric: str = "cost", groups: np.ndarray | None = None,
                     lo: float = 1e-3, hi: float = 1e3, iters: int = 40, mix: bool = False,
                     **fit_kwargs: Any) -> tuple[AnyPolicy, dict[str, Any]]:
    """Largest λ (best quality) whose policy keeps the mean ``metric`` ≤ ``budget``.

    ``metric`` is ``cost`` (mean cost per prompt, top-stage units) or ``top_fraction`` (share
    of prompts that reach the top stage). Larger λ escalates more, so both grow with λ;
    bisection on log λ. If even the smallest λ breaks the budget, the cheapest policy is
    returned with ``met: False`` (a reported best effort, not an error).

    ``mix``: return a ``MixedPolicy`` of the bracketing policies (the last λ within the budget
    and the first beyond it) whose expected ``metric`` equals the budget; ``info["value"]`` is
    then that expectation and ``info["mixed"]`` holds both λ, both values and ``q``.
    """
    def measure(lam: float) -> tuple[StoppingPolicy, float]:
        pol = fit_policy(P, Y, C, lam, groups=groups, **fit_kwargs)
        ev = evaluate(pol, P, Y, C, groups)
        top = P.shape[1] - 1
        m = ev["cost"].mean() if metric == "cost" else float((ev["stage"] == top).mean())
        return pol, float(m)

    if metric not in ("cost", "top_fraction"):
        raise ValueError(f"metric must be cost or top_fraction, got {metric!r}")
    pol_lo, m_lo = measure(lo)
    if m_lo > budget:
        return pol_lo, {"lambda": lo, "value": m_lo, "met": False,
                        "reason": f"no lambda >= {lo:g} meets {metric} <= {budget:g}"}
    pol_hi, m_hi = measure(hi)
    if m_hi <= budget:
        return pol_hi, {"lambda": hi, "value": m_hi, "met": True}
    a, b, best, over = np.log(lo), np.log(hi), (pol_lo, lo, m_lo), (pol_hi, hi, m_hi)
    for _ in range(iters):
        mid = (a + b) / 2
        pol, m = measure(float(np.exp(mid)))
        if m <= budget:
            a, best = mid, (pol, float(np.exp(mid)), m)
        else:
            b, over = mid, (pol, float(np.exp(mid)), m)
    info = {"lambda": best[1], "value": best[2], "met": True}
    if not mix or best[2] >= budget:
        return best[0], info
    q = (budget - best[2]) / (over[2] - best[2])
    info["value"] = budget
    info["mixed"] = {"lambda_low": best[1], "value_low": best[2], "lambda_high": over[1],
                     "value_high": over[2], "q": q}
    return MixedPolicy(best[0], over[0], q), info


def policy_to_dict(p: AnyPolicy) -> dict[str, Any]:
    """JSON-ready form of a fitted policy (for bundles and the server)."""
    if isinstance(p, MixedPolicy):
        return {"mixed": True, "q": p.q, "low": policy_to_dict(p.low),
                "high": policy_to_dict(p.high)}

    def dec(d: Decision) -> dict[str, Any]:
        return {"action": d.action, "next_stage": d.next_stage, "stop_value": d.stop_value,
                "go_value": d.go_value, "support": d.support}

    return {"lam": p.lam, "bin_edges": [e.tolist() for e in p.bin_edges], "entry": p.entry,
            "decisions": [{"group": g, "history": [list(h) for h in hist], **dec(d)}
                          for g, table in p.decisions.items() for hist, d in table.items()],
            "stage_fallback": {str(k): dec(d) for k, d in p.stage_fallback.items()},
            "risk_prior": list(p.risk_prior) if p.risk_prior else None,
            "expected_value": p.expected_value, "meta": p.meta, "escalate": p.escalate,
            "final_groups": list(p.final_groups)}


def policy_from_dict(d: dict[str, Any]) -> AnyPolicy:
    if d.get("mixed"):
        return MixedPolicy(policy_from_dict(d["low"]), policy_from_dict(d["high"]), float(d["q"]))

    def dec(x: dict[str, Any]) -> Decision:
        return Decision(x["action"], x["next_stage"], x["stop_value"], x["go_value"],
                        x["support"])

    tables: dict[str, dict[History, Decision]] = {}
    for x in d["decisions"]:
        if "group" not in x and set(d["entry"]) - {""}:
            raise PolicyFormatError(
                "this policy was saved before decisions were kept per prompt group (its "
                "grouped decisions were wrong); rebuild the bundle with `serve --build_bundle "
                "true`")
        tables.setdefault(x.get("group", ""), {})[tuple(tuple(h) for h in x["history"])] = dec(x)
    return StoppingPolicy(
        d["lam"], [np.asarray(e) for e in d["bin_edges"]], dict(d["entry"]), tables,
        {int(k): dec(v) for k, v in d["stage_fallback"].items()},
        tuple(d["risk_prior"]) if d["risk_prior"] else None, d["expected_value"],
        d.get("meta", {}), bool(d.get("escalate", True)), tuple(d.get("final_groups", ())))
