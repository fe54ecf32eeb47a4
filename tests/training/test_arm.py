"""One ``Arm`` type (``training/studies/arm.py``) for the study plans and the bench,
and every arm names a registered rule: a rule added to the registry without a
study arm or a bench arm is reported here (the figure and claims selectors
are checked in ``tests/paper_figures/test_rule_labels.py``)."""

from __future__ import annotations

from training.studies.arm import Arm
from training.studies.bench import ARMS
from training.pipeline.rules import REGISTRY
from training.studies.study import PLANS

# rules the bench leaves out, each with the reason: a rule added without a bench arm fails the test below
NOT_BENCHED = {"l2": "the no-dropout step plus a sum of squares of the parameters: the `none` arm's cost"}


def test_the_study_and_the_bench_use_the_one_arm_type():
    import training.studies.bench as bench
    import training.studies.study as study

    assert study.Arm is bench.Arm is Arm
    assert all(type(a) is Arm for p in PLANS.values() for a in p.arms) and all(type(a) is Arm for a in ARMS)
    # each kind's fields, the other kind's left at their defaults
    assert all(a.claim and not a.backend and not a.what for p in PLANS.values() for a in p.arms)
    assert all(a.backend in ("fused", "loop") and a.what and not a.claim and not a.key for a in ARMS)


def test_every_arm_names_a_registered_rule():
    bad = [(p.name, a.name, a.rule) for p in PLANS.values() for a in p.arms if a.rule not in REGISTRY]
    bad += [("bench", a.name, a.rule) for a in ARMS if a.rule not in REGISTRY]
    assert not bad, f"arms whose rule is not in training.pipeline.rules.REGISTRY: {bad}"


def test_every_registered_rule_has_a_study_arm_and_a_bench_arm():
    studied = {a.rule for a in PLANS["cpu-ptb"].arms}
    assert not set(REGISTRY) - studied, f"rules the cpu-ptb plan has no arm for: {sorted(set(REGISTRY) - studied)}"
    benched = {a.rule for a in ARMS}
    missing = sorted(set(REGISTRY) - benched - set(NOT_BENCHED))
    assert not missing, f"rules with no bench arm (training/studies/bench.py ARMS) and no NOT_BENCHED reason: {missing}"
    assert set(NOT_BENCHED) <= set(REGISTRY) - benched  # an exemption for a rule that is benched, or gone, is stale
