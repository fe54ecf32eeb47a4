"""How large is each update rule's noise beside SGD's own?  (results/cpu-ptb/README.md, "Gradient noise at this scale")

At the ``cpu-ptb`` scale DROPOUT_k gets *better* as k grows and ξ_approx
adds nothing measurable (claims C1 and C5), the opposite of the paper's
implicit-regularization story.  One candidate reason would be that the
minibatch noise of SGD dwarfs the noise dropout adds (measured: it does not;
dropout's is 2.2-2.6 times SGD's there).  This measures both on a trained
study model (a run's best checkpoint with its logged config)::

    python -m training.studies.noise_scale cpu-ptb-dropout-k1-s1 [--arms dropout-k1 inject-k4 ...]
                                   [--batches 10] [--draws 5] [--out results/cpu-ptb/noise_scale]

For each arm of the plan (its update rule exactly as the study trains it,
``UpdateRule.gradient``: objective gradient plus noise, before clipping) and
each of ``B`` consecutive training batches ``b`` (fixed length ``bptt``; the
incoming hidden state is the clean model's, carried from the start of the
training text), ``M`` update directions ``g(b, ω)`` are drawn with fresh
rule noise ``ω``.  With ``tr Cov`` the summed variance over all parameters:

- **rule noise** ``N_rule = E_b tr Cov_ω[g | b]``: the noise the rule adds
  on a fixed batch (dropout masks, ξ̃_drop, ξ_approx, and the probe noise of
  the finite-difference estimators);
- **batch noise** ``N_batch = tr Cov_b E_ω[g | b]``: SGD's own minibatch
  noise in that rule's expected update;
- **signal** ``‖E g‖²``.

All three are unbiased estimates from the batches' draws (``NoiseSums``); the
same is done for the clipped update ``g · min(1, clip/‖g‖)`` that the
optimizer applies.  Predictions the numbers can be held to: DROPOUT_k's rule
noise is DROPOUT_1's over ``k`` (independent draws), and DROPOUT_k +
ξ̃_drop's equals DROPOUT_1's (exact in expectation, Sec. 3.1); DROPOUT_k +
ξ_approx's equals it only as far as ``Cov ξ_approx ≈ Cov ξ_drop``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from dropcheck import DropcheckError

DEFAULT_ARMS = ("none", "dropout-k1", "dropout-k4", "inject-k4", "dropout-implicit-k4", "explicit-x1",
                "explicit-implicit")


@dataclass
class NoiseSums:
    """The decomposition of the module docstring, one batch of ``M`` draws at
    a time (``add_batch``).  Keeps each batch's mean draw (float32, ``B ×
    P``) for the jackknife over batches; everything else in float64."""

    within: list = field(default_factory=list)  # per batch: unbiased tr Cov over the draws
    means: list = field(default_factory=list)  # per batch: ḡ_b
    norms: list = field(default_factory=list)  # ‖g‖ of every draw
    draws: int = 0

    def add_batch(self, g: torch.Tensor) -> None:
        """``g``: ``(M, P)``, the ``M ≥ 2`` draws of one batch, flattened."""
        if g.dim() != 2 or g.size(0) < 2:
            raise DropcheckError(f"need at least 2 draws per batch as an (M, P) tensor, got shape {tuple(g.shape)}")
        if self.draws and g.size(0) != self.draws:
            raise DropcheckError(f"every batch needs the same number of draws ({self.draws}), got {g.size(0)}")
        g = g.double()
        self.draws = g.size(0)
        mean = g.mean(0)
        self.within.append(float(((g - mean) ** 2).sum() / (g.size(0) - 1)))
        self.means.append(mean.float())
        self.norms.extend(float(v) for v in g.norm(dim=1))

    @staticmethod
    def _estimates(K: torch.Tensor, within: torch.Tensor, M: int) -> tuple[float, float]:
        """``(batch_noise, signal)`` from the Gram matrix ``K`` of the batch
        means and the batches' within-batch variances."""
        B = K.size(0)
        total_sq = float(K.sum())  # ‖Σ_b ḡ_b‖²
        var_means = (float(K.diagonal().sum()) - total_sq / B) / (B - 1)  # tr Cov_b of ḡ_b, unbiased
        # ḡ_b carries Cov_ω / M of the rule noise; E‖ḡ‖² = ‖E g‖² + var_means / B
        return var_means - float(within.mean()) / M, total_sq / B**2 - var_means / B

    def result(self) -> dict:
        """``rule_noise``, ``batch_noise`` and ``signal`` (``‖E g‖²``), each with
        its standard error over batches (``_se``; the jackknife for the last
        two), and the draws' mean norm; needs ``B ≥ 3``."""
        B, M = len(self.within), self.draws
        if B < 3:
            raise DropcheckError(f"need at least 3 batches, got {B}")
        w = torch.tensor(self.within, dtype=torch.float64)
        G = torch.stack(self.means).double()
        K = G @ G.T
        batch, signal = self._estimates(K, w, M)
        keep = [[j for j in range(B) if j != i] for i in range(B)]
        loo = torch.tensor([self._estimates(K[i][:, i], w[i], M) for i in keep], dtype=torch.float64)
        jack = ((B - 1) / B * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
        return {
            "rule_noise": float(w.mean()),
            "rule_noise_se": float(w.std() / math.sqrt(B)),
            "batch_noise": batch,
            "batch_noise_se": float(jack[0]),
            "signal": signal,
            "signal_se": float(jack[1]),
            "mean_norm": sum(self.norms) / len(self.norms),
            "batches": B,
            "draws": M,
        }


def clipped(g: torch.Tensor, clip: float) -> torch.Tensor:
    """Rows of ``g`` scaled by ``min(1, clip/‖row‖)`` (``clip_grad_norm_``'s
    rule); ``clip = 0``: unchanged."""
    if not clip:
        return g
    return g * torch.clamp(clip / (g.norm(dim=1, keepdim=True) + 1e-6), max=1.0)


def measure(run: str, arms: Sequence[str] = DEFAULT_ARMS, *, plan: str = "cpu-ptb", batches: int = 10,
            draws: int = 5, seed: int = 0, runs_dir=None, data=None, corpus=None, progress: bool = True) -> dict:
    """The decomposition for every arm of ``plan`` in ``arms`` at ``run``'s
    best checkpoint (module docstring); arm -> {"raw": ..., "clipped": ...}.
    The corpus: ``corpus``, else the folder ``data`` (as ``--data``), else
    ``$DROPCHECK_DATA`` or ``../shared/data`` beside the checkout."""
    from tqdm import tqdm

    from ..pipeline import configs
    from . import study
    from ..pipeline.data import batchify, get_batch, load_corpus, resolve_corpus_dir
    from ..pipeline.factories import _ptb_dir, study_checkpoint
    from ..models.awd_lstm import StatefulLM, detach_hidden
    from ..pipeline.rules import Gens, make_rule, sites_off
    from ..pipeline.trainer import build_lm, resolve_backend

    if batches < 3 or draws < 2:
        raise DropcheckError(f"need --batches >= 3 and --draws >= 2, got {batches} and {draws}")
    the_plan = study.get_plan(plan)
    cfg0, ckpt = study_checkpoint(run, plan=plan, runs_dir=runs_dir)
    if corpus is None:
        corpus = load_corpus(resolve_corpus_dir(data, cfg0["corpus"]) if data else _ptb_dir())
    train = batchify(corpus.train[: cfg0["train_tokens"] or None], cfg0["batch_size"])
    if train.size(0) < batches * cfg0["bptt"] + 1:
        raise DropcheckError(f"the training text has {train.size(0)} rows, too few for {batches} batches of "
                             f"{cfg0['bptt']}")
    cpu = torch.device("cpu")
    out = {}
    bar = tqdm(total=len(arms) * batches, desc="noise", unit="batch", disable=not progress, file=sys.stderr)
    for arm in arms:
        cfg = configs.validate({**cfg0, **the_plan.arm(arm).overrides})
        lm = build_lm(cfg, corpus.vocab_size, cpu, torch.float32, resolve_backend(cfg, cpu))
        lm.load_state_dict(ckpt["model"])
        lm.train()
        model = StatefulLM(lm)
        rule = make_rule(cfg, model)
        gen = torch.Generator().manual_seed(seed)  # every arm from the same seed: common random numbers
        gens = Gens(gen, gen)
        raw, clip = NoiseSums(), NoiseSums()
        hidden = lm.init_state(cfg["batch_size"])
        for i in range(batches):
            x, y = get_batch(train, i * cfg["bptt"], cfg["bptt"])
            model.hidden = hidden
            flat = []
            for _ in range(draws):
                g, _res = rule.gradient(model, x, y, gens)
                flat.append(torch.cat([v.reshape(-1) for v in g.values()]).detach())
            G = torch.stack(flat)
            raw.add_batch(G)
            clip.add_batch(clipped(G, cfg["clip"]))
            with torch.no_grad(), sites_off(model):
                hidden = detach_hidden(lm(x, hidden)[1])
            bar.update()
        out[arm] = {"label": rule.label(cfg), "raw": raw.result(), "clipped": clip.result()}
    bar.close()
    return {"run": run, "plan": plan, "step": ckpt.get("step"), "valid_ppl": ckpt.get("valid_ppl"),
            "clip": cfg0["clip"], "bptt": cfg0["bptt"], "batch_size": cfg0["batch_size"], "batches": batches,
            "draws": draws, "seed": seed, "arms": out}


def rows(res: dict, which: str = "clipped") -> list[dict]:
    """One row per arm: rule and batch noise, their ratio, and the rule noise
    over DROPOUT_1's (where ``dropout-k1`` was measured)."""
    ref = res["arms"].get("dropout-k1", {}).get(which, {}).get("rule_noise")
    out = []
    for arm, r in res["arms"].items():
        v = r[which]
        out.append({
            "arm": arm,
            "label": r["label"],
            "rule_noise": v["rule_noise"],
            "rule_noise_se": v["rule_noise_se"],
            "batch_noise": v["batch_noise"],
            "batch_noise_se": v["batch_noise_se"],
            "rule_over_batch": v["rule_noise"] / v["batch_noise"] if v["batch_noise"] > 0 else float("nan"),
            "rule_over_dropout1": v["rule_noise"] / ref if ref else float("nan"),
            "signal": v["signal"],
            "mean_norm": v["mean_norm"],
        })
    return out


def markdown(res: dict) -> str:
    head = (f"# Gradient noise at `{res['run']}` (step {res['step']}, valid ppl {res['valid_ppl']:.2f})\n\n"
            f"`python -m training.studies.noise_scale {res['run']}`: {res['batches']} consecutive training batches of "
            f"{res['batch_size']} x {res['bptt']} tokens, {res['draws']} draws of each arm's update per batch "
            f"(seed {res['seed']}).  tr Cov summed over all parameters; ± a standard error over batches (the "
            "jackknife for batch noise).  See `training/studies/noise_scale.py` for the estimators.\n")
    parts = [head]
    for which, what in (("clipped", f"the clipped update (clip {res['clip']}), as the optimizer applies it"),
                        ("raw", "the raw update, before clipping")):
        parts.append(f"\n## {what[0].upper() + what[1:]}\n\n"
                     "| arm | rule noise | batch noise | rule / batch | rule / DROPOUT_1's | ‖E g‖² | mean ‖g‖ |\n"
                     "|---|---|---|---|---|---|---|\n")
        for r in rows(res, which):
            parts.append(f"| {r['label']} | {r['rule_noise']:.4g} ± {r['rule_noise_se']:.2g} "
                         f"| {r['batch_noise']:.4g} ± {r['batch_noise_se']:.2g} "
                         f"| {r['rule_over_batch']:.2f} | {r['rule_over_dropout1']:.2f} | {r['signal']:.3g} "
                         f"| {r['mean_norm']:.3f} |\n")
    return "".join(parts)


def plot(results: Sequence[dict], stem: Path, which: str = "clipped") -> list[Path]:
    """``stem.png``/``.pdf``: per arm, rule noise and batch noise (± 2
    standard errors), one panel per measured model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paper_figures.figures import save_figure

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 0.5 + 0.45 * len(results[0]["arms"])),
                             sharey=True, squeeze=False)
    for ax, res in zip(axes[0], results):
        rs = rows(res, which)
        y = list(range(len(rs)))
        for off, key, color, name in ((-0.18, "rule_noise", "tab:red", "rule noise (within a batch)"),
                                      (0.18, "batch_noise", "tab:blue", "minibatch noise (between batches)")):
            vals = [r[key] for r in rs]
            err = [2 * r[key + "_se"] for r in rs]
            ax.barh([v + off for v in y], vals, height=0.34, color=color, alpha=0.8, label=name, xerr=err,
                    error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(y, [r["label"] for r in rs])
        ax.invert_yaxis()
        ax.set_xlabel(f"tr Cov of the {which} update")
        ax.set_title(f"{res['run']}\n(step {res['step']}, valid ppl {res['valid_ppl']:.1f})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return save_figure(fig, stem)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.studies.noise_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="study runs whose best checkpoints to measure")
    ap.add_argument("--plan", default="cpu-ptb")
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="arms of the plan whose update rules to draw")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="corpus folder (default: $DROPCHECK_DATA or ../shared/data)")
    ap.add_argument("--runs-dir", default=None, help="folder of the runs' logs and checkpoints (default "
                    "results/runs/<plan>)")
    ap.add_argument("--out", default=None, help="folder for <run>.json / .md (default results/<plan>/noise_scale)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--redraw", action="store_true", help="measure nothing: redraw the table and figure from the "
                    "runs' JSON files in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[2] / "results" / args.plan / "noise_scale"
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = [_one(run, args, out) for run in args.runs]
    except DropcheckError as exc:
        print(f"noise_scale: error: {exc}", file=sys.stderr)
        return 2
    for path in plot(results, out / "noise_scale"):
        print(f"wrote {path}")
    return 0


def _one(run: str, args: argparse.Namespace, out: Path) -> dict:
    """Measure ``run`` (or, with ``--redraw``, read its JSON) and write its table."""
    if args.redraw:
        path = out / f"{run}.json"
        if not path.exists():
            raise DropcheckError(f"--redraw: {path} does not exist; measure {run} first")
        res = json.loads(path.read_text())
    else:
        res = measure(run, args.arms, plan=args.plan, batches=args.batches, draws=args.draws, seed=args.seed,
                      runs_dir=args.runs_dir, data=args.data, progress=not args.no_progress)
        (out / f"{run}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(markdown(res))
    (out / f"{run}.md").write_text(markdown(res))
    return res


if __name__ == "__main__":
    sys.exit(main())
