"""dropcheck: the explicit and implicit regularization of dropout, verified.

Wei, Kakade & Ma, "The Implicit and Explicit Regularization Effects of
Dropout", ICML 2020.  Equation numbers in the docstrings are the paper's;
the formulas are collected in docs/math.md, the design in docs/design.md.

Public API (docs/design.md)::

    import dropcheck as dc
    dc.explicit_regularizer(model, inputs, targets, estimator="exact")  # R_approx (4.4)
    dc.taylor_regularizer(model, inputs, targets)                      # R_taylor (4.2)
    dc.dropout_gap(model, inputs, targets, samples=1000)               # R_drop
    dc.taylor_regime(model, inputs, targets)                           # where the 2nd-order picture holds
    dc.implicit_noise(model, inputs, targets)                          # ξ_approx (4.5)
    dc.implicit_noise(..., sites=["lm.drop_emb"], generator={"lm.drop_emb": g})  # per-site options
    dc.dropout_k_gradient(model, inputs, targets, k)                   # Algorithm 1
    dc.bound.mu(W, X, y), dc.bound.nu(W, X, y)                         # Theorem 4.1
"""

from ._analytic import (
    AnalyticSession,
    Occurrence,
    SiteGenerators,
    analytic_mode,
    fixed_eta_policy,
    noise_policy,
    sample_eta,
    zero_probe,
)
from ._common import Estimate, value_checks
from ._errors import DataError, DropcheckError, NoDropoutSiteError
from ._explicit import explicit_regularizer, loss_jacobian_regularizer, taylor_regularizer
from ._gap import GapEstimate, dropout_gap, first_order_gap
from ._implicit import (
    dropout_gradient,
    dropout_k_gradient,
    implicit_noise,
    implicit_noise_covariance,
    implicit_noise_jacobian,
    noise_injected_dropout_k_gradient,
    two_draw_noise,
)
from ._regime import RegimeRow, TaylorRegime, taylor_regime
from ._surrogate import AnalyticObjective, analytic_dropout_objective
from ._site_api import find_sites, with_drop_probability
from ._sites import (
    DropConnect,
    GaussianDropout,
    LockedDropout,
    SiteSpec,
    WeightDrop,
    dropout_lambda,
)

__version__ = "0.1.0"


def __getattr__(name):  # dropcheck.bound and dropcheck.linear are imported on first use
    if name in ("bound", "linear"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dropcheck' has no attribute {name!r}")


__all__ = [
    "dropout_lambda",
    "explicit_regularizer",
    "taylor_regularizer",
    "loss_jacobian_regularizer",
    "dropout_gap",
    "first_order_gap",
    "taylor_regime",
    "TaylorRegime",
    "RegimeRow",
    "GapEstimate",
    "Estimate",
    "implicit_noise",
    "implicit_noise_covariance",
    "implicit_noise_jacobian",
    "dropout_gradient",
    "dropout_k_gradient",
    "two_draw_noise",
    "noise_injected_dropout_k_gradient",
    "analytic_dropout_objective",
    "AnalyticObjective",
    "analytic_mode",
    "sample_eta",
    "noise_policy",
    "fixed_eta_policy",
    "zero_probe",
    "AnalyticSession",
    "Occurrence",
    "SiteGenerators",
    "find_sites",
    "with_drop_probability",
    "SiteSpec",
    "LockedDropout",
    "DropConnect",
    "GaussianDropout",
    "WeightDrop",
    "value_checks",
    "DropcheckError",
    "NoDropoutSiteError",
    "DataError",
    "bound",
    "linear",
]
