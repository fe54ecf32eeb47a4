"""Verdicts on the paper's claims C1-C6, computed from run logs alone.

Arms are recognised from each log's header config (rule, k, multipliers,
noise structure), never from a hand-typed table; an arm's key is its run
name without the ``-s<seed>`` suffix, its seeds the configs' ``seed``.
Every number in ``claims.json`` and ``CLAIMS.md`` is read from the logs.

The rules (``docs/verdicts.md``, fixed before any number is judged):

- **Noise.** One rule for every comparison (``noise.py``): the pooled
  within-arm seed standard deviation over every arm with >= 2 seeds, with
  its degrees of freedom; A and B differ clearly when ``|Δmean| > t(0.975,
  df) · s_pooled · sqrt(1/n_A + 1/n_B)``.  The same margin names the close
  comparisons (``needs_seeds``) that more seeds could change.
- **Equal seeds.** A comparison is over the seeds both arms have; an arm
  with more seeds than the one it is compared with asks the driver for the
  other's missing seeds (``seed_targets``).
- **No selection on judged seeds.** Where a claim takes the best of several
  coefficients of one rule, the best is the lowest value on seed 1 (the
  lowest seed every coefficient has), and that arm is judged on its other
  seeds only; every coefficient is reported beside it.
- **Every half.** Each claim is split into the parts the paper states
  (``parts``: ``holds`` / ``fails`` / ``untestable here`` / ``not yet run``);
  a part whose arm or seed is missing is ``not yet run``, and so is the
  claim.  Where DROPOUT_k is not clearly worse than DROPOUT_1 there is
  nothing for a noise to recover, and that part is ``untestable here``.
- **Robustness.** Each verdict is given again on the best validation
  perplexity up to epoch 10 and up to the last epoch every run of the
  claim's arms reached (``at_epoch``), and runs that ended at the epoch cap
  while still improving are flagged (``capped_still_improving``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from .logs import Run
from .noise import Comparison, NoiseRule, common_seeds, compare_arms, first_within
from .rule_labels import check_rules

VERDICTS = ("reproduced", "partly", "not reproduced", "untestable here", "not yet run")
PART_VERDICTS = ("holds", "fails", "untestable here", "not yet run")
# C6: identity in place of H_out is "no better than ℓ2" while it closes less than this share of the gap from the
# best ℓ2 to the best R_approx alone (the paper's Table 1: (112.04 - 108.76) / (112.04 - 84.52) = 12%).
IDENTITY_SHARE = 0.25
# C5's speed half: the epochs (and tokens) an arm needs to come within this much of DROPOUT_1's best.
WITHIN = 0.01
EPOCH_BUDGET = 10

_SCALE = (
    "Scale: {scale}. A verdict here says whether the pattern appears for a small LSTM on a "
    "slice of PTB; it does not say the paper's numbers hold or fail at the paper's size "
    "(3 x 1150 AWD-LSTM, full PTB, hundreds of epochs), where regularization matters more and "
    "the second-order picture is closer to exact (wide layers)."
)


@dataclass
class ArmStats:
    key: str
    cfg: dict
    values: list  # best valid ppl per seed
    best_epochs: list
    test: list
    seed_ids: Optional[list] = None  # the seeds of ``values`` (default 1..n)
    curves: Optional[list] = None  # per seed: [(epoch, valid ppl, tokens seen)]
    runs: Optional[list] = None  # per seed: run name
    selected_on: tuple = ()  # seeds that chose this arm among its coefficients (not judged)
    label: str = ""  # the paper's name (``Run.label``: the log header's, else the label table's)
    claim: Optional[str] = None  # the claim the arm serves, where its logs' headers record one

    def __post_init__(self):
        if self.seed_ids is None:
            self.seed_ids = list(range(1, len(self.values) + 1))

    @property
    def by_seed(self) -> dict[int, float]:
        return dict(zip(self.seed_ids, self.values))

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def spread(self) -> float:
        return max(self.values) - min(self.values)

    @property
    def seeds(self) -> int:
        return len(self.values)

    def as_json(self) -> dict:
        return {
            "best_valid_ppl_mean": round(self.mean, 4),
            "best_valid_ppl_spread": round(self.spread, 4) if self.seeds > 1 else None,
            "seeds": self.seeds,
            "seed_ids": list(self.seed_ids),
            "best_valid_ppl": [round(v, 4) for v in self.values],
            "best_epoch_mean": round(sum(self.best_epochs) / len(self.best_epochs), 2) if self.best_epochs else None,
            "test_ppl_mean": round(sum(self.test) / len(self.test), 4) if self.test else None,
            **({"selected_on_seeds": list(self.selected_on)} if self.selected_on else {}),
            **({"claim": self.claim} if self.claim else {}),
        }

    def text(self) -> str:
        s = f"{self.mean:.2f}"
        if self.seeds > 1:
            s += f" (range {self.spread:.2f}, {self.seeds} seeds)"
        else:
            s += " (1 seed)"
        return s


def arm_key(run: Run) -> str:
    """The arm a run is a seed of (``Run.arm_key``: the header's plan and arm, else the run name less ``-s<seed>``)."""
    return run.arm_key


def _seed(run: Run) -> Optional[int]:
    s = run.config.get("seed", run.header.get("seed"))
    if isinstance(s, int):
        return s
    m = re.search(r"-s(\d+)$", str(run.header.get("run_name") or run.path.stem))
    return int(m.group(1)) if m else None


def _best_epoch(run: Run) -> Optional[float]:
    if not run.final:
        return None
    step = run.final.get("best_step")
    for e in run.evals:
        if e.get("step") == step:
            return float(e.get("epoch", math.nan))
    return None


def _curve(run: Run, max_epoch: Optional[float]) -> list[tuple[float, float, Optional[float]]]:
    out = []
    for e in run.evals:
        ep, v = e.get("epoch"), e.get("valid_ppl")
        if not isinstance(ep, (int, float)) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if max_epoch is not None and ep > max_epoch + 1e-9:
            break
        out.append((float(ep), float(v), e.get("tokens_seen")))
    return out


def collect(runs: list[Run], max_epoch: Optional[float] = None) -> dict[str, ArmStats]:
    """Complete runs (with a final line) grouped by arm key, ordered by seed.
    ``max_epoch``: each run's best validation perplexity up to that epoch
    (a run that stopped before it keeps its best)."""
    per: dict[str, list] = {}
    for r in runs:
        if not r.final or not math.isfinite(r.best_valid()):
            continue
        seed = _seed(r)
        curve = _curve(r, max_epoch)
        if max_epoch is None:
            best, be = r.best_valid(), _best_epoch(r)
        elif curve:
            i = min(range(len(curve)), key=lambda j: curve[j][1])
            best, be = curve[i][1], curve[i][0]
        else:
            continue
        per.setdefault(arm_key(r), []).append((seed if seed is not None else 0, r, best, be, curve))
    arms: dict[str, ArmStats] = {}
    for key, items in per.items():
        items.sort(key=lambda x: x[0])
        seeds = [s for s, *_ in items]
        if len(set(seeds)) < len(seeds):  # seeds not told apart: number them in file order
            seeds = list(range(1, len(items) + 1))
        arms[key] = ArmStats(
            key, dict(items[0][1].config), [b for _, _, b, _, _ in items],
            [be for _, _, _, be, _ in items if be is not None],
            [r.test_ppl() for _, r, _, _, _ in items if max_epoch is None and math.isfinite(r.test_ppl())],
            seeds, [c for *_, c in items], [r.name for _, r, *_ in items],
            label=items[0][1].label, claim=next((r.claim for _, r, *_ in items if r.claim), None))
    return arms


def capped_still_improving(runs: list[Run]) -> list[str]:
    """Runs that ended at the epoch cap (``stop: budget``) with their best at
    the last evaluation: the cap, not the patience rule, ended them."""
    out = []
    for r in runs:
        if r.final and r.final.get("stop") == "budget" and r.evals and r.final.get("best_step") == r.evals[-1].get("step"):
            out.append(str(r.header.get("run_name") or r.path.stem))
    return sorted(out)


# --- recognising arms from their configs ------------------------------------

def _is(rule: str, **kw) -> Callable[[dict], bool]:
    check_rules(rule)

    def pred(c: dict) -> bool:
        if c.get("rule") != rule:
            return False
        for k, v in kw.items():
            if k == "k":
                if int(c.get("k", 1)) != v:
                    return False
            elif c.get(k, {"noise_structure": "locked", "ablation_noise": False}.get(k)) != v:
                return False
        return True

    return pred


def _find(arms: dict[str, ArmStats], pred) -> list[ArmStats]:
    return sorted((a for a in arms.values() if pred(a.cfg)), key=lambda a: a.key)


def pick(candidates: list[ArmStats]) -> tuple[Optional[ArmStats], str]:
    """The best of several coefficients of one rule, chosen on one seed and
    judged on the others: ``(arm with selected_on set, note)``.  One candidate
    is taken as it is (nothing was chosen); None while the candidates share no seed."""
    if not candidates:
        return None, ""
    if len(candidates) == 1:
        return candidates[0], ""
    shared = common_seeds(*(a.by_seed for a in candidates))
    if not shared:
        return None, "the coefficients share no seed to choose on yet"
    s = shared[0]
    best = min(candidates, key=lambda a: (a.by_seed[s], a.key))
    note = (f"{best.key} chosen on seed {s} (" + ", ".join(f"{a.key} {a.by_seed[s]:.2f}" for a in candidates)
            + f"), so judged on its other seeds")
    return replace(best, selected_on=(s,)), note


def _with(group: list[ArmStats], *picked: Optional[ArmStats]) -> list[ArmStats]:
    """``group`` with each picked arm in place of its unpicked self (its ``selected_on`` shows)."""
    by = {p.key: p for p in picked if p is not None}
    return [by.get(a.key, a) for a in group]


def _pick_one(arms: dict[str, ArmStats], pred) -> Optional[ArmStats]:
    return pick(_find(arms, pred))[0]


# --- one judgement -----------------------------------------------------------

@dataclass
class _Judge:
    arms: dict[str, ArmStats]
    rule: NoiseRule
    scale: str
    compared: list = field(default_factory=list)  # (Comparison, arm A, arm B) of the claim being judged

    targets: dict = field(default_factory=dict)  # arm key -> seeds its comparisons want

    def cmp(self, a: ArmStats, b: ArmStats, record: bool = True) -> Comparison:
        c = compare_arms(a.by_seed, b.by_seed, self.rule, (a.key, b.key), (a.selected_on, b.selected_on))
        if record:
            self.compared.append((c, a, b))
            self.want(c.outcome == "not yet run", a, b)
        return c

    def want(self, nyr: bool, *arms: ArmStats) -> None:
        """The seeds that equalize ``arms`` (the most any has), or, while they
        share no judged seed, the first seed that chose none of them."""
        if nyr:
            banned = set().union(*(set(x.selected_on) for x in arms))
            s = next(i for i in range(1, 10 ** 6) if i not in banned)
            need = [(x, s) for x in arms if s not in x.by_seed]
        else:
            n = max(max(x.seed_ids) for x in arms)
            need = [(x, n) for x in arms if x.seeds < n]
        for x, n in need:
            self.targets[x.key] = max(self.targets.get(x.key, 0), n)


def _part(name: str, verdict: str, comparisons: list[Comparison], note: str = "") -> dict:
    assert verdict in PART_VERDICTS, verdict
    return {"part": name, "verdict": verdict, "note": note, "comparisons": [c.as_json() for c in comparisons],
            "_text": "; ".join(c.text() for c in comparisons)}


def _missing_part(name: str, need: dict) -> Optional[dict]:
    """A ``not yet run`` part while any entry of ``need`` (label -> arm) is None."""
    missing = [n for n, v in need.items() if v is None]
    if not missing:
        return None
    return _part(name, "not yet run", [], "no complete run yet of " + ", ".join(missing))


def _nyr(*cs: Comparison) -> bool:
    return any(c.outcome == "not yet run" for c in cs)


def combine(parts: list[dict]) -> str:
    """A claim's verdict from its parts: any part not yet run -> ``not yet run``;
    none decided -> ``untestable here``; every part holds -> ``reproduced``;
    none holds -> ``not reproduced``; else ``partly``."""
    vs = [p["verdict"] for p in parts]
    if "not yet run" in vs:
        return "not yet run"
    decided = [v for v in vs if v in ("holds", "fails")]
    if not decided:
        return "untestable here"
    if all(v == "holds" for v in vs):
        return "reproduced"
    if "holds" not in decided:
        return "not reproduced"
    return "partly"


def _claim(cid: str, verdict: str, parts: list[dict], used: list[ArmStats], scale: str, extra: str = "") -> dict:
    assert verdict in VERDICTS, verdict
    text = " ".join(" ".join([f"[{p['part']}: {p['verdict']}]"] + [x.rstrip(".") + "." for x in (p["_text"], p["note"])
                                                                    if x]) for p in parts)
    for p in parts:
        del p["_text"]
    summary = (text + (" " + extra if extra else "")).strip()
    return {"id": cid, "verdict": verdict, "summary": summary + " " + _SCALE.format(scale=scale), "parts": parts,
            "arms": {a.key: a.as_json() for a in used if a is not None}}


def _c1(j: _Judge, none, d) -> dict:
    """C1: DROPOUT_k worse as k grows; DROPOUT_8 (the largest k) still better than no dropout."""
    used = [none, *d.values()]
    miss = _missing_part("DROPOUT_k worse as k grows", {f"DROPOUT_{k}": v for k, v in d.items()})
    miss2 = _missing_part("DROPOUT_8 beats no dropout", {"DROPOUT_8": d[8], "no dropout": none})
    if miss or miss2:
        parts = [miss or _part("DROPOUT_k worse as k grows", "not yet run", []), miss2 or
                 _part("DROPOUT_8 beats no dropout", "not yet run", [])]
        return _claim("C1", "not yet run", parts, used, j.scale)
    steps = [j.cmp(d[b], d[a]) for a, b in ((1, 2), (2, 4), (4, 8))]  # each larger k against the smaller
    top = j.cmp(d[8], d[1])
    if _nyr(top, *steps):
        pa = _part("DROPOUT_k worse as k grows", "not yet run", [top, *steps])
    else:
        grows = top.outcome == "worse" and all(s.outcome != "better" for s in steps)
        pa = _part("DROPOUT_k worse as k grows", "holds" if grows else "fails", [top, *steps],
                   "" if grows else "DROPOUT_8 is not clearly worse than DROPOUT_1, or a larger k is clearly better")
    vs_none = j.cmp(d[8], none)
    pb = _part("DROPOUT_8 beats no dropout", "not yet run" if _nyr(vs_none) else
               ("holds" if vs_none.outcome == "better" else "fails"), [vs_none])
    # the trend is the claim; beating no dropout qualifies it
    if "not yet run" in (pa["verdict"], pb["verdict"]):
        verdict = "not yet run"
    elif pa["verdict"] == "holds":
        verdict = "reproduced" if pb["verdict"] == "holds" else "partly"
    else:
        verdict = "not reproduced"
    means = "DROPOUT_k (all seeds): " + "; ".join(f"k={k} {d[k].text()}" for k in d) + f"; no dropout {none.text()}."
    return _claim("C1", verdict, [pa, pb], used, j.scale, means)


def _recovers(j: _Judge, x: ArmStats, dk: ArmStats, d1: ArmStats, k: int, noise: str) -> list[dict]:
    """Parts of "DROPOUT_k + ``noise`` recovers DROPOUT_1": reaches DROPOUT_1's level,
    and is clearly better than DROPOUT_k.  Both need the paper's gap (DROPOUT_k
    clearly worse than DROPOUT_1); without it they are untestable here, and the
    note says what the noise did."""
    name1, name2 = f"k={k}: reaches DROPOUT_1", f"k={k}: better than DROPOUT_{k}"
    gap, vs1, vsk = j.cmp(dk, d1), j.cmp(x, d1), j.cmp(x, dk)
    if _nyr(gap, vs1, vsk):
        return [_part(name1, "not yet run", [vs1, gap]), _part(name2, "not yet run", [vsk])]
    if gap.outcome != "worse":
        if gap.outcome == "same":
            note = f"DROPOUT_{k} is not clearly worse than DROPOUT_1 here, so there is nothing for the {noise} to recover"
        else:
            moved = {("worse", "same"): f"brings DROPOUT_{k} back to DROPOUT_1's level (it accounts for the "
                                        f"difference, but here restoring it hurts)",
                     ("worse", "better"): f"moves DROPOUT_{k} part of the way back to DROPOUT_1",
                     ("worse", "worse"): f"makes DROPOUT_{k} worse than DROPOUT_1",
                     ("same", "same"): f"ends level with both DROPOUT_{k} and DROPOUT_1, so these seeds cannot tell "
                                       f"whether it moved DROPOUT_{k}"}.get(
                (vsk.outcome, vs1.outcome),
                f"leaves DROPOUT_{k} where it was" if vsk.outcome == "same" else f"improves DROPOUT_{k} further")
            note = (f"The gap runs the other way here (DROPOUT_{k} clearly better than DROPOUT_1), so the paper's "
                    f"recovery cannot be tested; the {noise} {moved}")
        return [_part(f"k={k}: recovers DROPOUT_1", "untestable here", [gap, vs1, vsk], note)]
    return [_part(name1, "holds" if vs1.outcome in ("same", "better") else "fails", [vs1, gap]),
            _part(name2, "holds" if vsk.outcome == "better" else "fails", [vsk])]


def _c2(j: _Judge, none, d) -> dict:
    """C2: DROPOUT_4 + ξ̃_drop recovers DROPOUT_1."""
    inj = _pick_one(j.arms, _is("dropout_inject", k=4))
    miss = _missing_part("k=4: recovers DROPOUT_1", {"DROPOUT_1": d[1], "DROPOUT_4": d[4], "DROPOUT_4 + ξ̃_drop": inj})
    if miss:
        return _claim("C2", "not yet run", [miss], [d[1], d[4], inj], j.scale)
    parts = _recovers(j, inj, d[4], d[1], 4, "injected noise")
    return _claim("C2", combine(parts), parts, [d[1], d[4], inj], j.scale)


def _every_coef(j: _Judge, arms: list[ArmStats], *against: ArmStats) -> str:
    """Every coefficient against each of ``against`` on its own seeds (reported, not judged)."""
    out = []
    for a in arms:
        out.append(f"{a.key} {a.text()}: " + ", ".join(f"vs {b.key} {j.cmp(a, b, record=False).outcome}"
                                                      for b in against if b is not None))
    return "; ".join(out)


def _c3(j: _Judge, none, d) -> dict:
    """C3: R_approx alone beats the largest-k DROPOUT_k but does not reach DROPOUT_1."""
    expl = _find(j.arms, _is("explicit"))
    best, note = pick(expl)
    used = [d[1], d[8], *_with(expl, best)]
    parts = []
    for name, label, other, want in (("beats DROPOUT_8 (the paper: DROPOUT_32)", "DROPOUT_8", d[8], "better"),
                                     ("short of DROPOUT_1", "DROPOUT_1", d[1], "worse")):
        miss = _missing_part(name, {"R_approx": best, label: other})
        if miss:
            parts.append(miss)
            continue
        c = j.cmp(best, other)
        parts.append(_part(name, "not yet run" if _nyr(c) else ("holds" if c.outcome == want else "fails"), [c]))
    if note:
        parts[0]["note"] = (parts[0]["note"] + "; " if parts[0]["note"] else "") + note
    extra = ("Every coefficient on its own seeds (reported, not judged): " + _every_coef(j, expl, d[8], d[1]) + "."
             if expl else "")
    return _claim("C3", combine(parts), parts, used, j.scale, extra)


def _c4(j: _Judge, none, d) -> dict:
    """C4: DROPOUT_k + sqrt(1-1/k) ξ_approx tracks DROPOUT_1 for k = 2, 4, 8
    (each k as C2 judges its injection: ``_recovers``)."""
    di = {k: _pick_one(j.arms, _is("dropout_implicit", k=k)) for k in (2, 4, 8)}
    parts = []
    for k, x in di.items():
        miss = _missing_part(f"k={k}: recovers DROPOUT_1", {"DROPOUT_1": d[1], f"DROPOUT_{k}": d[k],
                                                            f"DROPOUT_{k} + ξ_approx": x})
        parts += [miss] if miss else _recovers(j, x, d[k], d[1], k, "analytic noise")
    return _claim("C4", combine(parts), parts, [d[1], *di.values(), *(d[k] for k in di)], j.scale)


def _epochs_to(arm: ArmStats, target: float, seeds) -> dict[int, Optional[tuple]]:
    curves = dict(zip(arm.seed_ids, arm.curves or [[]] * arm.seeds))
    return {s: first_within(curves.get(s, []), target) for s in seeds}


def speed_table(arms: dict[str, ArmStats], d1: Optional[ArmStats]) -> dict:
    """C5's speed half for every arm: the epoch (and training tokens) at which
    each seed first comes within 1% of DROPOUT_1's best (mean over its seeds)."""
    if d1 is None:
        return {}
    target = (1 + WITHIN) * d1.mean
    out = {"target_valid_ppl": round(target, 4), "within": WITHIN, "arms": {}}
    for key, a in sorted(arms.items()):
        hits = _epochs_to(a, target, a.seed_ids)
        out["arms"][key] = {"seeds": list(a.seed_ids),
                            "epochs": [h[0] if h else None for h in hits.values()],
                            "tokens": [h[1] if h else None for h in hits.values()]}
    return out


def _speed_part(j: _Judge, ei: ArmStats, d1: ArmStats) -> tuple[dict, str]:
    """Does R_approx + ξ_approx come within 1% of DROPOUT_1's best in clearly
    fewer epochs than DROPOUT_1 itself?  On the seeds both have; the noise rule
    applied to epochs (pooled over every arm whose seeds all get there).  A
    DROPOUT_1 seed that never gets there counts as its last epoch + 1 (a bound
    that favours DROPOUT_1); a seed of R_approx + ξ_approx that never gets
    there fails the half."""
    seeds = common_seeds(ei.by_seed, d1.by_seed, exclude=(ei.selected_on, d1.selected_on))
    name = "fewer epochs to DROPOUT_1's level"
    if not seeds:
        return _part(name, "not yet run", [], "no common seed"), ""
    target = (1 + WITHIN) * sum(d1.by_seed[s] for s in seeds) / len(seeds)
    he, h1 = _epochs_to(ei, target, seeds), _epochs_to(d1, target, seeds)
    last1 = dict(zip(d1.seed_ids, [c[-1][0] if c else math.nan for c in (d1.curves or [])]))
    e_ei = {s: h[0] for s, h in he.items() if h}
    e_d1 = {s: (h[0] if h else last1.get(s, math.nan) + 1) for s, h in h1.items()}
    samples = []
    for a in j.arms.values():
        hits = _epochs_to(a, target, a.seed_ids)
        if a.seeds >= 2 and all(hits.values()):
            samples.append([h[0] for h in hits.values()])
    rule = NoiseRule.pooled(samples)
    # evaluations come once per ``res`` epochs, so an epoch count is known to within res: its rounding
    # alone has SD res/sqrt(12), a floor for the pooled SD when a few seeds happen to agree exactly
    steps = sorted(b[0] - a[0] for c in (ei.curves or []) + (d1.curves or []) for a, b in zip(c, c[1:]))
    res = steps[len(steps) // 2] if steps else 1.0
    rule = NoiseRule(max(rule.s_pooled if math.isfinite(rule.s_pooled) else 0.0, res / math.sqrt(12)), rule.df)
    tok = lambda h: ", ".join(f"{h[s][1]:,}" if h[s] and h[s][1] is not None else "-" for s in seeds)  # noqa: E731
    desc = (f"within {WITHIN:.0%} of DROPOUT_1's best ({target:.2f}) at epochs "
            f"{', '.join(f'{h[0]:g}' if h else 'never' for h in he.values())} (tokens {tok(he)}) for {ei.key}, "
            f"{', '.join(f'{h[0]:g}' if h else 'never' for h in h1.values())} (tokens {tok(h1)}) for {d1.key}, "
            f"seeds {', '.join(map(str, seeds))}; epoch noise s_pooled {rule.s_pooled:.2f}, df {rule.df}")
    if len(e_ei) < len(seeds):
        return _part(name, "fails", [], desc + f"; {ei.key} does not get there on every seed"), desc
    c = compare_arms(e_ei, e_d1, rule, (f"{ei.key} epochs", f"{d1.key} epochs"))
    verdict = "not yet run" if _nyr(c) else ("holds" if c.outcome == "better" else "fails")
    return _part(name, verdict, [c], desc), desc


def _c5(j: _Judge, none, d) -> dict:
    """C5: R_approx + ξ_approx matches DROPOUT_1, and gets there in fewer epochs."""
    expl = _find(j.arms, _is("explicit"))
    ei = _pick_one(j.arms, _is("explicit_implicit", noise_structure="locked"))
    eip = _pick_one(j.arms, _is("explicit_implicit", noise_structure="positions"))
    used = [d[1], ei, eip, *expl]
    miss = _missing_part("matches DROPOUT_1", {"DROPOUT_1": d[1], "R_approx + ξ_approx": ei})
    if miss:
        return _claim("C5", "not yet run", [miss, _part("fewer epochs to DROPOUT_1's level", "not yet run", [])],
                      used, j.scale)
    m = j.cmp(ei, d[1])
    pm = _part("matches DROPOUT_1", "not yet run" if _nyr(m) else
               ("holds" if m.outcome in ("same", "better") else "fails"), [m])
    ps, _ = _speed_part(j, ei, d[1])
    extra = []
    same = [a for a in expl if a.cfg.get("explicit_mult", 1.0) == ei.cfg.get("explicit_mult", 1.0)]
    if same:
        extra.append(f"Against R_approx alone at the same coefficient: {j.cmp(ei, same[0], record=False).text()}")
    best, note = pick(expl)
    if best is not None and (not same or best.key != same[0].key):
        extra.append(f"Against the best coefficient of R_approx alone ({note}): "
                     f"{j.cmp(ei, best, record=False).text()}")
    if eip is not None:
        extra.append(f"Per-position noise structure: {j.cmp(eip, d[1], record=False).text()}; against locked: "
                     f"{j.cmp(eip, ei, record=False).outcome}")
    return _claim("C5", combine([pm, ps]), [pm, ps], used, j.scale, ". ".join(extra) + "." if extra else "")


def _identity_part(j: _Judge, bi: ArmStats, bl: ArmStats, br: ArmStats) -> dict:
    """Identity in place of H_out is no better than ℓ2: it does not close clearly more
    than ``IDENTITY_SHARE`` of the gap from ℓ2 to R_approx alone.  With T = ℓ2 -
    share (ℓ2 - R_approx), fails when T - identity > t s sqrt((1 + (1-θ)² + θ²)/n)."""
    name = f"identity H_out no better than ℓ2 (closes < {IDENTITY_SHARE:.0%} of the ℓ2 → R_approx gap)"
    seeds = common_seeds(bi.by_seed, bl.by_seed, br.by_seed, exclude=(bi.selected_on, bl.selected_on, br.selected_on))
    j.want(not seeds, bi, bl, br)
    if seeds and j.rule.df < 1:
        return _part(name, "not yet run", [], "no arm has a second seed yet (no noise estimate)")
    if not seeds:
        ex = set(bi.selected_on) | set(bl.selected_on) | set(br.selected_on)
        s = min(x for x in range(1, 1000) if x not in ex)
        need = [f"{a.key} seed {s}" for a in (bi, bl, br) if s not in a.by_seed]
        return _part(name, "not yet run", [], "needs " + ", ".join(need) + " (a seed that chose none of the three)")
    n = len(seeds)
    mean = lambda a: sum(a.by_seed[s] for s in seeds) / n  # noqa: E731
    mi, ml, mr = mean(bi), mean(bl), mean(br)
    th = IDENTITY_SHARE
    t_point = ml - th * (ml - mr)
    margin = j.rule.margin(n) * math.sqrt(1 + (1 - th) ** 2 + th ** 2) if math.isfinite(j.rule.margin(n)) else math.inf
    share = (ml - mi) / (ml - mr) if ml != mr else math.nan
    out = "fails" if t_point - mi > margin else "holds"
    c = Comparison(bi.key, f"{bl.key} - {th:g} x ({bl.key} - {br.key})", seeds, mi, t_point, margin,
                   "better" if t_point - mi > margin else ("worse" if mi - t_point > margin else "same"))
    return _part(name, out, [c], f"{bi.key} closes {share:.0%} of the gap from {bl.key} ({ml:.2f}) to {br.key} "
                                  f"({mr:.2f}); the paper's Table 1 numbers give 12%")


def _c6(j: _Judge, none, d) -> dict:
    """C6: identity in place of H_out is no better than ℓ2; R̃_approx (loss
    Jacobian, tuned) with ξ_approx does not match DROPOUT_1."""
    ident, l2 = _find(j.arms, _is("identity_hessian")), _find(j.arms, _is("l2"))
    expl = _find(j.arms, _is("explicit"))
    ljn = _find(j.arms, _is("loss_jacobian", ablation_noise=True))
    lj = _find(j.arms, _is("loss_jacobian", ablation_noise=False))
    (bi, ni), (bl, nl), (br, nr), (bjn, njn), (bj, nj) = (pick(x) for x in (ident, l2, expl, ljn, lj))
    used = [d[1], *_with(ident, bi), *_with(l2, bl), *_with(lj, bj), *_with(ljn, bjn)]
    parts = []
    name1 = f"identity H_out no better than ℓ2 (closes < {IDENTITY_SHARE:.0%} of the ℓ2 → R_approx gap)"
    miss = _missing_part(name1, {"identity H_out": bi, "ℓ2": bl, "R_approx": br})
    p1 = miss or _identity_part(j, bi, bl, br)
    notes = "; ".join(n for n in (ni, nl, nr) if n)
    if notes:
        p1["note"] = (p1["note"] + "; " if p1["note"] else "") + notes
    parts.append(p1)
    name2 = "R̃_approx + ξ_approx short of DROPOUT_1"
    miss = _missing_part(name2, {"R̃_approx + ξ_approx": bjn, "DROPOUT_1": d[1]})
    if miss:
        parts.append(miss)
    else:
        c = j.cmp(bjn, d[1])
        parts.append(_part(name2, "not yet run" if _nyr(c) else ("holds" if c.outcome == "worse" else "fails"),
                           [c], njn))
    extra = []
    if bj is not None and d[1] is not None:
        extra.append(f"R̃_approx without noise ({nj or 'one coefficient'}), reported: "
                     f"{j.cmp(bj, d[1], record=False).text()}"
                     + (f"; {j.cmp(bj, br, record=False).text()}" if br is not None else ""))
    extra.append("Coefficients tried: " + "; ".join(f"{a.key} {a.text()}" for a in [*ident, *l2, *lj, *ljn]))
    return _claim("C6", combine(parts), parts, used, j.scale, ". ".join(extra) + ".")


CLAIMS = (_c1, _c2, _c3, _c4, _c5, _c6)


def noise_rule(arms: dict[str, ArmStats]) -> NoiseRule:
    """The study's noise rule: pooled over every arm with >= 2 seeds (all its seeds)."""
    return NoiseRule.pooled(a.values for a in arms.values())


def judge(arms: dict[str, ArmStats], scale: str, rule: Optional[NoiseRule] = None) -> list[dict]:
    """One verdict per claim (module docstring), each with the arms of its close
    comparisons (``needs_seeds``) and the seed counts that would equalize its
    comparisons or run the seeds it is missing (``seed_targets``)."""
    rule = rule or noise_rule(arms)
    none = _pick_one(arms, _is("none"))
    d = {k: _pick_one(arms, _is("dropout", k=k)) for k in (1, 2, 4, 8)}
    out = []
    for claim in CLAIMS:
        j = _Judge(arms, rule, scale)
        c = claim(j, none, d)
        close = {x.key for comp, a, b in j.compared if comp.outcome == "same" for x in (a, b)}
        c["needs_seeds"] = sorted(close)
        c["seed_targets"] = dict(sorted(j.targets.items()))
        out.append(c)
    return out


def _scale(runs: list[Run]) -> str:
    cfgs = [r.config for r in runs if r.config]
    if not cfgs:
        return "unknown"
    c = cfgs[0]
    tok = int(c.get("train_tokens", 0) or 0)
    devices = sorted({r.device for r in runs})
    return (f"{c.get('corpus')} with {'all' if not tok else f'the first {tok:,}'} training tokens, "
            f"emb {c.get('emb')}, {c.get('layers')} x {c.get('hidden')} LSTM, q = {c.get('q_hidden')}, "
            f"device {', '.join(devices)}")


def _last_epoch(run: Run) -> float:
    return max((float(e.get("epoch", 0.0)) for e in run.evals), default=0.0)


def robustness(runs: list[Run], claims: list[dict], scale: str) -> None:
    """Add ``at_epoch`` to each claim: its verdict on the best validation
    perplexity up to epoch 10, and up to the last epoch every run of its arms reached."""
    complete = [r for r in runs if r.final]
    cache: dict[float, dict] = {}

    def verdicts_at(e: float) -> dict:
        if e not in cache:
            cache[e] = {c["id"]: c["verdict"] for c in judge(collect(complete, max_epoch=e), scale)}
        return cache[e]

    for c in claims:
        mine = [r for r in complete if arm_key(r) in c["arms"]]
        last = min((_last_epoch(r) for r in mine), default=0.0)
        at = {}
        for e in sorted({float(EPOCH_BUDGET), last}):
            if e > 0:
                at[f"{e:g}"] = verdicts_at(e)[c["id"]]
        c["at_epoch"] = at
        c["last_common_epoch"] = last if mine else None


def write_claims(runs: list[Run], out: Path, plan_name: str = "", figure: Optional[str] = None,
                 figures: Optional[dict] = None) -> list[Path]:
    """``claims.json`` and ``CLAIMS.md`` under ``out``; ``figure``: an image
    beside them (``summary.draw_summary``'s) that CLAIMS.md shows; ``figures``:
    claim id -> the image of its learning curves."""
    arms = collect(runs)
    scale = _scale(runs)
    rule = noise_rule(arms)
    claims = judge(arms, scale, rule)
    robustness(runs, claims, scale)
    capped = capped_still_improving(runs)
    for c in claims:
        mine = [r for r in capped if re.sub(r"-s\d+$", "", r) in c["arms"]]
        c["capped_still_improving"] = mine
    cpu_min = sum(float(r.final.get("wall_time", 0.0)) for r in runs if r.final) / 60.0
    d1 = _pick_one(arms, _is("dropout", k=1))
    doc = {
        "plan": plan_name,
        "scale": scale,
        "noise_rule": rule.as_json(),
        "identity_share_threshold": IDENTITY_SHARE,
        "training_minutes_total": round(cpu_min, 1),
        "capped_still_improving": capped,
        "claims": claims,
        "speed": speed_table(arms, d1),
        "all_arms": {k: a.as_json() for k, a in sorted(arms.items())},
    }
    jpath, mpath = out / "claims.json", out / "CLAIMS.md"
    jpath.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    s = "-" if not math.isfinite(rule.s_pooled) else f"{rule.s_pooled:.2f}"
    t = "-" if not math.isfinite(rule.t) else f"{rule.t:.3f}"
    lines = [f"# Claims C1-C6{f' — plan {plan_name}' if plan_name else ''}", "",
             "Generated by `dropcheck reproduce` from the run logs (`paper_figures/claims.py`); do not edit.", "",
             f"Scale: {scale}. Training time of the complete runs: {cpu_min:.1f} min.", "",
             f"Noise rule (`docs/verdicts.md`): pooled within-arm seed SD s_pooled = {s} over every arm with at "
             f"least 2 seeds, df = {rule.df}, t(0.975, df) = {t}. Two arms differ clearly when |difference of "
             f"means| > t · s_pooled · sqrt(1/n₁ + 1/n₂), on the seeds both have; an arm chosen among "
             f"coefficients on seed 1 is judged on its other seeds. Margins: {_margins(rule)}.", "",
             "| claim | verdict | epoch 10 | last common epoch | parts |", "|---|---|---|---|---|"]
    for c in claims:
        at = c["at_epoch"]
        last = c["last_common_epoch"]
        lines.append(f"| {c['id']} | **{c['verdict']}** | {at.get(f'{float(EPOCH_BUDGET):g}', '-')} | "
                     + (f"{at.get(f'{last:g}', '-')} (epoch {last:g})" if last else "-") + " | "
                     + "; ".join(f"{p['part']}: {p['verdict']}" for p in c["parts"]) + " |")
    lines += ["", "## Each claim", ""]
    for c in claims:
        lines += [f"### {c['id']}: {c['verdict']}", ""]
        if figures and c["id"] in figures:
            lines += [f"![learning curves of {c['id']}'s arms]({figures[c['id']]})", ""]
        lines += [c["summary"].split(" Scale: ")[0], ""]
        if c["capped_still_improving"]:
            lines += ["Ended at the epoch cap while still improving: " + ", ".join(c["capped_still_improving"])
                      + ".", ""]
    close = sorted({k for c in claims for k in c["needs_seeds"]})
    targets: dict[str, int] = {}
    for c in claims:
        for k, n in c["seed_targets"].items():
            targets[k] = max(targets.get(k, 0), n)
    if close:
        lines += [f"Close comparisons (difference within the margin): `dropcheck reproduce` runs `--seeds` seeds "
                  f"of " + ", ".join(close) + "."]
    if targets:
        lines += ["", "Seeds that equalize the compared arms, or that a judgement still needs (arm: seeds wanted; "
                  "`dropcheck reproduce --status` lists the runs): "
                  + ", ".join(f"{k}: {n}" for k, n in sorted(targets.items())) + "."]
    lines += ["", _SCALE.format(scale=scale), "", "## Every arm", ""]
    if figure:
        lines += [f"![every arm's best validation perplexity per seed]({figure})", ""]
    lines += ["| arm | seeds | best valid ppl (mean) | range | best epoch (mean) | test ppl (mean) | epochs to within "
              f"{WITHIN:.0%} of DROPOUT_1's best |",
              "|---|---:|---:|---:|---:|---:|---|"]
    f = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    sp = doc["speed"].get("arms", {}) if doc["speed"] else {}
    for k, a in sorted(arms.items(), key=lambda kv: (kv[1].mean, kv[0])):
        jj = a.as_json()
        ep = sp.get(k, {}).get("epochs", [])
        eps = ", ".join("never" if e is None else f"{e:g}" for e in ep) if ep else "-"
        lines.append(f"| {k} | {jj['seeds']} | {f(jj['best_valid_ppl_mean'])} | {f(jj['best_valid_ppl_spread'])} | "
                     f"{f(jj['best_epoch_mean'])} | {f(jj['test_ppl_mean'])} | {eps} |")
    if capped:
        lines += ["", "Runs that ended at the epoch cap while still improving (best at the last evaluation, stop "
                  "`budget`): " + ", ".join(capped) + "."]
    mpath.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [jpath, mpath]


def _margins(rule: NoiseRule) -> str:
    if rule.df < 1:
        return "none yet (no arm has 2 seeds)"
    return ", ".join(f"{n} vs {n} seeds {rule.margin(n, n):.2f}" for n in (1, 2, 3))
