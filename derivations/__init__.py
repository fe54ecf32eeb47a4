"""derivations: docs/math.md derived symbolically (SymPy) on small networks.

An independent route: this package imports nothing from ``dropcheck`` or
``training`` (a reference that shares code with what it checks proves
nothing).  It builds MLPs of depth 1-3 (weight layers) with activations
``tanh``, ``sigmoid``, ``softplus``, ``identity``, softmax cross-entropy over
``c`` classes and Bernoulli dropout sites on the input and on hidden
activations, each with its own symbolic ``q``; derives

- the law of the noise ``η`` (from the mask ``m ~ Bernoulli(1-q)``), its
  moments, and the second-order coefficient ``½E[η²]`` of the gap
  (4.1)-(4.2), which it shows to be ``q/(2(1-q))`` (never typed in);
- ``H_out = D²_z ℓ`` and ``p - e_y`` by differentiating the loss;
- ``R_taylor`` (full Hessian), the Gauss-Newton part ``R_approx`` (4.3)-(4.4)
  and the dropped model-Hessian part, per site;
- the exact gap ``E_η ℓ - ℓ`` by enumerating all masks, and the first Taylor
  coefficient in ``q`` of that enumerated sum, equal to ``Σ Δ_ik``;
- the implicit noise ``ξ = ∇_W Σ_i J_loss,i (η_i ⊙ h_i)`` and its
  covariance ``Σ_u Var(η_u) b_u b_uᵀ`` (4.5)-(4.6);

and emits reference values for the torch implementation to be checked
against.  Entry points: :func:`build_case` (one spec -> one case dict),
:func:`derive` (symbolic derivation of one shape, cached),
``python -m derivations emit --out FILE.json [--cases default]``.

Spec format: see :mod:`derivations.cases`.

JSON schema of the emitted file (``schema_version`` 1)
------------------------------------------------------
All floats are float64 written with ``repr`` (they round-trip exactly);
"per site" lists follow the spec's sites sorted by layer; values are means
over the ``n`` examples (each example has its own masks)::

    {
      "schema_version": 1,
      "generator": str, "versions": {"python", "sympy", "numpy"},
      "ratio_qs": [0.01, 0.05, 0.1],
      "total_seconds": float,
      "cases": [case, ...]
    }

    case = {
      "name": str,
      "spec": spec (normalized; the numbers the references were computed at),
      "shape": {"sizes", "activations", "site_layers", "depth", "classes"},
      "sites": [{"layer", "q", "units", "torch_name"}],   # torch_name: index in
                                                          # the nn.Sequential layout
      "param_order": [[name, shape], ...],  # linear1.weight (out,in), linear1.bias, ...
      "reference": {
        "loss": mean ℓ,
        "logits": n × c,
        "lambda": per site, λ_i = ½E[η²] (derived),
        "variance": per site, Var η = q/(1-q) (derived),
        "R_drop_exact": mean_n Σ_masks P ℓ(masked) - ℓ,
        "R_taylor": Σ_i λ_i ⟨D²_{h_i}(ℓ∘F_i), diag(h_i²)⟩ (weighted, summed),
        "R_taylor_per_site": weighted, per site,
        "R_taylor_unweighted": {"per_site", "total"},
        "R_approx": {"unweighted": {"per_site", "total"},
                     "weighted":   {"per_site", "total"}},   # Σ_i ⟨JᵀH_outJ, diag(h²)⟩
        "model_hessian_part": {"unweighted": ..., "weighted": ...},
                             # R_taylor - R_approx: ⟨Σ_c (∂ℓ/∂z_c) D²F_c, diag(h²)⟩
        "H_out": n × c × c (diag(p) - ppᵀ per example),
        "loss_jacobian": n × c (p - e_y per example),
        "first_order_coefficient": d/dq R_drop at q = 0, all sites at q
                                   (series of the enumerated exact gap),
        "first_order_coefficient_per_site": ∂R_drop/∂q_i at q = 0,
        "first_order_coefficient_delta": {"per_site", "total"}: Σ Δ_ik by definition,
        "delta_per_unit": Δ_ik (mean over examples), units in site order,
        "taylor_first_order_coefficient": {"per_site", "total"}:
                                   d/dq R_taylor at 0 = ½ Σ h² ∂²ℓ/∂h²,
        "limit_ratio": first_order_coefficient / taylor_first_order_coefficient.total
                       (lim_{q→0} R_drop/R_taylor),
        "implicit_cov": P × P, Cov ξ of the mean loss
                        = (1/n²) Σ_n Σ_u Var(η_u) b_u b_uᵀ, b_u = ∇_θ (h_u ∂ℓ_n/∂h_u),
                        parameters in param_order
      },
      "gap_taylor_ratio": {"0.01": {"q", "R_drop_exact", "R_taylor", "ratio"}, ...},
                          # every site at that q
      "expressions": {   # formulas (SymPy str, parsable by sympy.sympify) and source
        "symbols": {...}, "eta_law", "E_eta", "E_eta2", "variance", "lambda_derived",
        "lambda_per_site", "second_order_coefficients", "loss_in_logits",
        "loss_jacobian_in_logits", "H_out_in_logits", "first_order_series_terms",
        "loss_eta" (ℓ(θ, x, e, s, η) or null if long), "taylor_u_at_eta0" (or null),
        "loss_program_source" (lambdified Python source of ℓ(η))
      },
      "timing": {"derive_seconds", "derive_seconds_uncached", "derive_breakdown",
                 "cached", "evaluate_seconds", "total_seconds"},
      "size": {"units", "masks", "params", "examples", "program_assignments",
               "point_function_assignments", "json_bytes"}
    }

In the formulas ``s`` is a shift of the log-sum-exp that cancels exactly
(set to the largest clean logit when evaluating) and ``e_c`` is the one-hot
label.
"""

from .cases import (
    MAX_UNITS,
    RATIO_QS,
    SpecError,
    build_case,
    evaluate,
    expressions,
    normalize_spec,
    random_spec,
    spec_shape,
    torch_layout,
)
from .defaults import DEFAULT_CASES, default_specs
from .network import ACTIVATIONS, Derivation, Shape, clear_cache, derive, forward_expr, loss_of_logits
from .noise import derived_lambda, eta_law, eta_moment, eta_variance, second_order_expectation
from .program import Program

__all__ = [
    "build_case",
    "evaluate",
    "expressions",
    "normalize_spec",
    "random_spec",
    "spec_shape",
    "torch_layout",
    "SpecError",
    "MAX_UNITS",
    "RATIO_QS",
    "DEFAULT_CASES",
    "default_specs",
    "ACTIVATIONS",
    "Derivation",
    "Shape",
    "derive",
    "clear_cache",
    "forward_expr",
    "loss_of_logits",
    "derived_lambda",
    "eta_law",
    "eta_moment",
    "eta_variance",
    "second_order_expectation",
    "Program",
]
