"""Cross-route checks: symbolic references (derivations) vs dropcheck (torch).

Every quantity is compared in float64 with relative tolerance 1e-9 (and an
absolute floor of 1e-12 for values that cancel in both routes, such as
``p - p²`` in a saturated softmax).  The symbolic route shares no code with
dropcheck: the only common ground is the spec's numbers and the
``nn.Sequential`` layout built here.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from hypothesis import example, given, settings

import derivations as D




import torch_helpers as T  # noqa: E402  (tests/derivations is on pytest's pythonpath)


@settings(deadline=None)
@given(spec=T.specs())
@example(spec=T.saturated_spec())
@example(spec=T.tiny_q_spec())
@example(spec=T.last_linear_spec())
def test_symbolic_matches_dropcheck(spec):
    """(a) per site weighted/unweighted R_approx, R_taylor, exact gap, ΣΔ and
    Cov ξ: symbolic vs dropcheck in float64."""
    case = D.build_case(spec, with_expressions=False)
    errs = T.disagreements(spec, case)
    bad = {k: v for k, v in errs.items() if not v <= T.RTOL}
    assert not bad, f"symbolic vs dropcheck disagree (relative): {bad}"


@settings(deadline=None)
@given(spec=T.specs(max_depth=2))
@example(spec=T.saturated_spec())
def test_output_hessian_matches_autograd(spec):
    """(c) symbolic H_out and p - e_y vs torch.autograd on the cross-entropy."""
    case = D.build_case(spec, with_expressions=False)
    model = T.torch_model(spec).eval()
    X, y = T.torch_data(spec)
    with torch.no_grad():
        Z = model(X)
    for i in range(len(spec["y"])):
        z = Z[i].clone().requires_grad_(True)

        def ce(v, i=i):
            return F.cross_entropy(v[None], y[i : i + 1])

        H = torch.autograd.functional.hessian(ce, z)
        (g,) = torch.autograd.grad(ce(z), z)
        assert T.rel_err(case["reference"]["H_out"][i], H.numpy()) <= T.RTOL
        assert T.rel_err(case["reference"]["loss_jacobian"][i], g.numpy()) <= T.RTOL
        assert T.rel_err(case["reference"]["logits"][i], Z[i].numpy()) <= T.RTOL
