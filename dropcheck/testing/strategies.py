"""Hypothesis strategies for property-based suites on dropout models.

Every draw is bounded and finite, and every random tensor or network is
rebuilt from drawn integer seeds through ``torch.Generator``, so a failing
example prints a value that replays it.  Needs Hypothesis
(``pip install hypothesis``).
"""

from __future__ import annotations

try:
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - exercised only without hypothesis
    raise ImportError(
        "dropcheck.testing.strategies needs Hypothesis: pip install hypothesis"
    ) from exc

import torch

from ._networks import SITE_KINDS, Case, build_case

__all__ = ["seeds", "generators", "drop_probabilities", "float_tensors", "targets", "network_specs", "networks",
           "SITE_KINDS", "Case", "build_case"]


def seeds() -> st.SearchStrategy[int]:
    """Integer seeds in ``[0, 2**31)``."""
    return st.integers(0, 2**31 - 1)


class SeededGenerator(torch.Generator):
    """A CPU ``torch.Generator`` that remembers its seed and prints it, so a
    failing example shows ``SeededGenerator(seed)``."""

    def __new__(cls, seed: int):
        g = super().__new__(cls, "cpu")
        g.seed_value = int(seed)
        g.manual_seed(g.seed_value)
        return g

    def __init__(self, seed: int):
        pass

    def __repr__(self) -> str:
        return f"SeededGenerator({self.seed_value})"


def generators() -> st.SearchStrategy[torch.Generator]:
    """Fresh CPU generators seeded from ``seeds()`` (each draw is a new
    generator at the start of its stream)."""
    return seeds().map(SeededGenerator)


def drop_probabilities(min_value: float = 1e-3, max_value: float = 0.9) -> st.SearchStrategy[float]:
    """Drop probabilities ``q`` in ``[min_value, max_value]`` ⊂ ``(0, 1)``."""
    if not 0.0 <= min_value <= max_value < 1.0:
        raise ValueError(f"need 0 <= min_value <= max_value < 1, got [{min_value}, {max_value}]")
    return st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)


def float_tensors(shape, *, scale: float = 1.0, dtype=torch.float64) -> st.SearchStrategy[torch.Tensor]:
    """Standard normal tensors of ``shape`` times ``scale``, drawn from a seed."""
    shape = tuple(shape)
    return seeds().map(lambda s: scale * torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=dtype))


def targets(shape, classes: int, *, ignore: bool = True) -> st.SearchStrategy[torch.Tensor]:
    """Class indices in ``[0, classes)`` of ``shape``; with ``ignore`` some
    positions are ``-100`` (ignored, as in PyTorch and Hugging Face), never all."""
    shape = tuple(shape)

    @st.composite
    def strat(draw):
        g = torch.Generator().manual_seed(draw(seeds()))
        y = torch.randint(0, classes, shape, generator=g)
        if ignore and y.numel() > 1:
            frac = draw(st.sampled_from([0.0, 0.25, 0.5]))
            drop = torch.rand(shape, generator=g) < frac
            drop.view(-1)[0] = False
            y = torch.where(drop, torch.full_like(y, -100), y)
        return y

    return strat()


def network_specs(kinds=SITE_KINDS, *, max_blocks: int = 3, q_min: float = 0.05, q_max: float = 0.5,
                  max_width: int = 4, max_n: int = 3, max_t: int = 3, ignore: bool = True) -> st.SearchStrategy[dict]:
    """Descriptions of small float64 networks (``build_case`` builds them):
    1..``max_blocks`` blocks, each with one site of a kind from ``kinds``
    (``SITE_KINDS``: ``nn.Dropout``, ``Dropout1d`` channels, ``LockedDropout``,
    ``GaussianDropout``, ``F.dropout``, attention dropout in
    ``scaled_dot_product_attention``, DropConnect, timm-style ``DropPath``),
    its ``q`` in ``[q_min, q_max]``, width 2..``max_width``, 2..4 classes,
    1..``max_n`` sequences of 2..``max_t`` positions, weight scale in
    [0.5, 2], targets with some ``-100`` when ``ignore``."""
    kinds = tuple(kinds)
    unknown = set(kinds) - set(SITE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a nonempty subset of {SITE_KINDS}, got {kinds}")

    @st.composite
    def strat(draw):
        nb = draw(st.integers(1, max_blocks))
        blocks = [(draw(st.sampled_from(kinds)), round(draw(drop_probabilities(q_min, q_max)), 4)) for _ in range(nb)]
        return dict(blocks=blocks, d=draw(st.integers(2, max_width)), classes=draw(st.integers(2, 4)),
                    n=draw(st.integers(1, max_n)), t=draw(st.integers(2, max_t)),
                    scale=round(draw(st.floats(0.5, 2.0)), 3), ignore=0.25 if ignore and draw(st.booleans()) else 0.0,
                    seed=draw(seeds()))

    return strat()


def networks(kinds=SITE_KINDS, **kw) -> st.SearchStrategy[Case]:
    """``Case``s (model, inputs, targets) built from ``network_specs(kinds, **kw)``;
    a failing example prints ``build_case({...})``, which rebuilds it."""
    return network_specs(kinds, **kw).map(build_case)
