"""Locked vs per-position analytic terms on the smoke AWD-LSTM (docs/math.md, open points).

The official code treats positions as independent in the analytic terms even
where the dropout it replaces is locked over time.  This measures, per site,
the λ-weighted ``R_approx`` with the locked structure and with
``independent_positions=True``, by the sampled-label estimator (20 batches
of 10 draws each; mean ± standard error).  About a minute on CPU::

    python -m training.studies.locked_vs_positions
"""

from __future__ import annotations

import math

import torch

import dropcheck as dc

from ..pipeline.factories import smoke_lm


def measure(reps: int = 20, samples: int = 10, seed: int = 0) -> dict:
    model, X, Y = smoke_lm()
    out = {}
    for indep in (False, True):
        g = torch.Generator().manual_seed(seed)
        vals = [
            {k: float(v.detach()) for k, v in dc.explicit_regularizer(
                model, X, Y, estimator="sampled", samples=samples, generator=g, per_site=True,
                independent_positions=indep).items()}
            for _ in range(reps)
        ]
        out["per_position" if indep else "locked"] = {
            k: (float(torch.tensor([v[k] for v in vals]).mean()),
                float(torch.tensor([v[k] for v in vals]).std() / math.sqrt(reps)))
            for k in vals[0]
        }
    return out


def main() -> None:
    torch.set_num_threads(1)
    res = measure()
    a, b = res["locked"], res["per_position"]
    for k in a:
        print(f"{k:18s} locked {a[k][0]:.4g} ± {a[k][1]:.1g}   per-position {b[k][0]:.4g} ± {b[k][1]:.1g}"
              f"   ratio {b[k][0] / a[k][0]:.3f}")
    ta, tb = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    print(f"total              locked {ta:.4g}   per-position {tb:.4g}   ratio {tb / ta:.3f}")


if __name__ == "__main__":
    main()
