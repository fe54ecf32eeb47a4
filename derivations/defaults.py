"""The default case set of ``python -m derivations emit`` (``--cases default``).

Small enough for exact enumeration (at most 7 dropped units per example,
128 masks), covering depth 1-3, every activation, input and hidden sites,
``c`` = 2-3 and ``n`` = 1-2 examples.  Numbers come from
:func:`derivations.cases.random_spec` with fixed seeds and are stored
concretely in every emitted case.
"""

from __future__ import annotations

from .cases import random_spec

__all__ = ["DEFAULT_CASES", "default_specs"]

# (name, sizes, activations, sites, n, seed, weight_scale, note)
DEFAULT_CASES = (
    ("d1-input-c3", [3, 3], [], [(0, 0.2)], 2, 11, 1.5,
     "softmax regression; only softmax follows the site, so R_taylor = weighted R_approx"),
    ("d2-tanh-input-hidden", [2, 3, 2], ["tanh"], [(0, 0.1), (1, 0.3)], 2, 12, 2.0,
     "two sites with different q"),
    ("d2-sigmoid-hidden-c3", [3, 3, 3], ["sigmoid"], [(1, 0.25)], 1, 13, 2.0,
     "site on the input of the last Linear: R_taylor = weighted R_approx"),
    ("d2-softplus-input", [2, 3, 2], ["softplus"], [(0, 0.2)], 2, 14, 1.5,
     "a nonlinearity follows the site: R_taylor != weighted R_approx"),
    ("d2-identity-input-hidden-c3", [3, 2, 3], ["identity"], [(0, 0.15), (1, 0.1)], 1, 15, 1.5,
     "linear hidden layer"),
    ("d2-tanh-saturated", [3, 2, 2], ["tanh"], [(1, 0.05)], 2, 16, 12.0,
     "large weights: a saturated softmax"),
    ("d3-tanh-sigmoid", [2, 3, 3, 2], ["tanh", "sigmoid"], [(0, 0.1), (2, 0.2)], 2, 17, 2.0,
     "depth 3, input and last hidden site"),
    ("d3-softplus-tanh-c3", [2, 4, 3, 3], ["softplus", "tanh"], [(1, 0.15), (2, 0.3)], 1, 18, 2.0,
     "depth 3, width 4, two hidden sites (7 units)"),
)


def default_specs() -> list:
    """The default specs, with concrete numbers."""
    out = []
    for name, sizes, acts, sites, n, seed, scale, note in DEFAULT_CASES:
        spec = random_spec(
            sizes,
            acts,
            [{"layer": k, "q": q} for k, q in sites],
            n=n,
            seed=seed,
            weight_scale=scale,
            name=name,
        )
        spec["note"] = note
        out.append(spec)
    return out
