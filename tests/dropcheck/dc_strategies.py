"""Hypothesis strategies (bounded, finite; every draw is rebuilt from seeds)."""

from __future__ import annotations

from dc_cases import ACTS


def _st():
    from hypothesis import strategies as st

    return st


def mlp_cases(acts=tuple(ACTS), max_hidden=2, min_hidden=0, last_only=False, q_min=1e-3, q_max=0.9,
              max_n=4, max_width=4):
    """A float64 MLP description: 0..2 hidden layers of width 1..4, ``c`` in 2..4,
    sites on a nonempty subset of {input, hidden outputs} (``last_only``: only
    the last layer's input), q in [q_min, q_max], weight scale in [0.3, 3],
    1..max_n examples, integer seeds for the weights and the data."""
    st = _st()
    from dropcheck.testing.strategies import drop_probabilities, seeds  # the public kit's bounded draws

    @st.composite
    def strat(draw):
        n_hidden = draw(st.integers(min_hidden, max_hidden))
        sizes = [draw(st.integers(1, max_width)) for _ in range(n_hidden + 1)] + [draw(st.integers(2, 4))]
        act = [draw(st.sampled_from(acts)) for _ in range(n_hidden)]
        if last_only:
            layers = {n_hidden}
        else:
            layers = draw(st.sets(st.integers(0, n_hidden), min_size=1))
        qs = {k: draw(drop_probabilities(q_min, q_max)) for k in sorted(layers)}
        scale = draw(st.floats(0.3, 3.0))
        n = draw(st.integers(1, max_n))
        seed = draw(seeds())
        return dict(sizes=sizes, acts=act, sites=qs, scale=scale, n=n, seed=seed)

    return strat()
