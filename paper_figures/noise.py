"""The noise rule every verdict uses (``docs/verdicts.md``), written once.

The seed noise of a study is the pooled within-arm standard deviation of the
seeds, over every arm with at least 2 seeds:

    s_pooled² = Σ_arms Σ_seeds (x - mean_arm)² / df,    df = Σ_arms (n_arm - 1).

Two arms A and B, compared on the same n_A = n_B seeds, *differ clearly* when

    |mean_A - mean_B| > t(0.975, df) · s_pooled · sqrt(1/n_A + 1/n_B)

(a two-sided 95% t test with the pooled variance; ``scipy.stats.t``).  The
same margin says which comparisons need more seeds: those whose difference
is within it.  ``compare_arms`` is the whole rule for two arms given as
``{seed: value}``; ``compare_gaps`` compares two differences of arms (a
claim such as C7, "the DROPOUT_4 - DROPOUT_1 gap is larger at 0.2x data than
at 1x"), whose variance is s_pooled² · Σ 1/n_i over its four arms.

Comparisons use the seeds the compared arms have in common (equal seed
counts), less any seed that selected an arm (``exclude``): a coefficient
chosen on seed 1 is judged on seeds 2..n only.  With no common seed left,
or no arm of two seeds yet (df = 0: no noise estimate), the outcome is
``"not yet run"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

LEVEL = 0.975  # two-sided 95%
OUTCOMES = ("better", "worse", "same", "not yet run")


@dataclass(frozen=True)
class NoiseRule:
    """The pooled within-arm seed standard deviation and its degrees of freedom."""

    s_pooled: float
    df: int

    @classmethod
    def pooled(cls, samples: Iterable[Sequence[float]]) -> "NoiseRule":
        """From the seeds' values of every arm (arms with fewer than 2 seeds add nothing)."""
        ss, df = 0.0, 0
        for xs in samples:
            xs = [float(x) for x in xs if math.isfinite(float(x))]
            if len(xs) < 2:
                continue
            m = sum(xs) / len(xs)
            ss += sum((x - m) ** 2 for x in xs)
            df += len(xs) - 1
        return cls(math.sqrt(ss / df) if df else math.nan, df)

    @property
    def t(self) -> float:
        """t(0.975, df); infinite while df = 0."""
        if self.df < 1:
            return math.inf
        from scipy.stats import t

        return float(t.ppf(LEVEL, self.df))

    def margin(self, *ns: int) -> float:
        """``t(0.975, df) · s_pooled · sqrt(Σ 1/n_i)`` for arms of ``ns`` seeds each."""
        if self.df < 1 or any(n < 1 for n in ns):
            return math.inf
        return self.t * self.s_pooled * math.sqrt(sum(1.0 / n for n in ns))

    def as_json(self) -> dict:
        return {"s_pooled": None if not math.isfinite(self.s_pooled) else round(self.s_pooled, 4),
                "df": self.df, "t_0.975": None if not math.isfinite(self.t) else round(self.t, 4),
                "rule": "A and B differ clearly when |mean_A - mean_B| > t(0.975, df) * s_pooled * "
                        "sqrt(1/n_A + 1/n_B), on the seeds both have (less any seed that selected either)"}


@dataclass(frozen=True)
class Comparison:
    """A against B under the noise rule; ``outcome`` says how A does (lower is better)."""

    a: str
    b: str
    seeds: tuple[int, ...]  # the common seeds both means are over
    mean_a: float
    mean_b: float
    margin: float
    outcome: str  # better | worse | same | not yet run
    missing: tuple[str, ...] = ()  # for "not yet run": the runs a judgement needs

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def diff(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def close(self) -> bool:
        """Within the margin: more seeds could change it."""
        return self.outcome == "same"

    def text(self) -> str:
        if self.outcome == "not yet run":
            return f"{self.a} vs {self.b}: not yet run (needs {', '.join(self.missing) or 'a common seed'})"
        seeds = ", ".join(map(str, self.seeds))
        return (f"{self.a} {self.mean_a:.2f} vs {self.b} {self.mean_b:.2f} (seed{'s' if self.n > 1 else ''} "
                f"{seeds}; difference {self.diff:+.2f}, margin {self.margin:.2f}): {self.outcome}")

    def as_json(self) -> dict:
        r = lambda v: None if not math.isfinite(v) else round(v, 4)  # noqa: E731
        return {"a": self.a, "b": self.b, "outcome": self.outcome, "seeds": list(self.seeds),
                "n_a": self.n, "n_b": self.n, "mean_a": r(self.mean_a), "mean_b": r(self.mean_b),
                "difference": r(self.diff), "margin": r(self.margin), **({"missing": list(self.missing)}
                                                                         if self.missing else {})}


def _outcome(diff: float, margin: float) -> str:
    if diff < -margin:
        return "better"
    if diff > margin:
        return "worse"
    return "same"


def common_seeds(*arms: Mapping[int, float], exclude: Sequence[Iterable[int]] = ()) -> tuple[int, ...]:
    """The seeds every arm has, less the seeds in ``exclude[i]`` for arm i."""
    sets = [set(a) - set(exclude[i] if i < len(exclude) else ()) for i, a in enumerate(arms)]
    return tuple(sorted(set.intersection(*sets))) if sets else ()


def compare_arms(a: Mapping[int, float], b: Mapping[int, float], rule: NoiseRule, names: tuple[str, str] = ("A", "B"),
                 exclude: tuple[Iterable[int], Iterable[int]] = ((), ())) -> Comparison:
    """Arm A against arm B (``{seed: value}``, lower is better) under ``rule``,
    on their common seeds less ``exclude`` (each arm's selecting seeds)."""
    seeds = common_seeds(a, b, exclude=exclude)
    if not seeds:
        need = _missing(names, (a, b), exclude)
        return Comparison(names[0], names[1], (), math.nan, math.nan, math.inf, "not yet run", need)
    if rule.df < 1:
        return Comparison(names[0], names[1], seeds, math.nan, math.nan, math.inf, "not yet run",
                          ("a second seed of some arm (no noise estimate yet)",))
    ma = sum(a[s] for s in seeds) / len(seeds)
    mb = sum(b[s] for s in seeds) / len(seeds)
    m = rule.margin(len(seeds), len(seeds))
    return Comparison(names[0], names[1], seeds, ma, mb, m, _outcome(ma - mb, m))


def _missing(names, arms, exclude) -> tuple[str, ...]:
    """Which seed runs would give two arms a common judged seed: the lowest seed
    that neither excludes, for each arm that lacks it."""
    banned = set().union(*(set(e) for e in exclude)) if exclude else set()
    s = 1
    while s in banned:
        s += 1
    return tuple(f"{n} seed {s}" for n, a in zip(names, arms) if s not in a)


@dataclass(frozen=True)
class GapComparison:
    """(A - B) against (C - D), each gap over the seeds all four arms share."""

    gap_ab: float
    gap_cd: float
    seeds: tuple[int, ...]
    margin: float
    outcome: str  # "larger" | "smaller" | "same" | "not yet run": how (A - B) compares with (C - D)

    def as_json(self) -> dict:
        r = lambda v: None if not math.isfinite(v) else round(v, 4)  # noqa: E731
        return {"gap_ab": r(self.gap_ab), "gap_cd": r(self.gap_cd), "seeds": list(self.seeds),
                "margin": r(self.margin), "outcome": self.outcome}


def compare_gaps(a: Mapping[int, float], b: Mapping[int, float], c: Mapping[int, float], d: Mapping[int, float],
                 rule: NoiseRule) -> GapComparison:
    """Is the gap mean(A) - mean(B) clearly larger or smaller than mean(C) - mean(D)?
    The difference of the gaps has variance s_pooled² · (1/n_A + 1/n_B + 1/n_C + 1/n_D)."""
    seeds = common_seeds(a, b, c, d)
    if not seeds or rule.df < 1:
        return GapComparison(math.nan, math.nan, seeds, math.inf, "not yet run")
    mean = lambda x: sum(x[s] for s in seeds) / len(seeds)  # noqa: E731
    g1, g2 = mean(a) - mean(b), mean(c) - mean(d)
    n = len(seeds)
    m = rule.margin(n, n, n, n)
    out = "larger" if g1 - g2 > m else ("smaller" if g2 - g1 > m else "same")
    return GapComparison(g1, g2, seeds, m, out)


def first_within(curve: Sequence[tuple[float, float, Optional[float]]], target: float):
    """The first ``(epoch, tokens)`` of a validation curve ``[(epoch, ppl, tokens)]``
    at or below ``target``; None if it never gets there."""
    for epoch, ppl, tokens in curve:
        if ppl <= target:
            return epoch, tokens
    return None
