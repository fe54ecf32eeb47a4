"""``dropcheck bound``: Theorem 4.1 along training of linear softmax models.

Trains ``z = W x`` (no bias, float64 torch, minibatch SGD, zero
initialisation, a fixed seed) on a real data set with several regularizers
and evaluates every quantity of Theorem 4.1 (:mod:`dropcheck.bound`) on the
clean model after each ``--eval-every`` epochs:

- ``none``: cross-entropy only;
- ``l2``: cross-entropy ``+ (l2/2) ‖W‖_F²``;
- ``dropout``: cross-entropy of the model on the dropped input
  ``x ⊙ m/(1-q)``, ``m ~ Bernoulli(1-q)`` per example and feature (one draw
  per step);
- ``explicit``: cross-entropy ``+`` the closed-form dropout-matched penalty
  :func:`dropcheck.linear.explicit_penalty_linear` (``λ = q/(2(1-q))``);
- ``explicit+implicit``: the same, plus one sample of the analytic update
  noise :func:`dropcheck.linear.implicit_noise_linear` added to each
  minibatch gradient (Algorithm 2 with ``λ₁ = λ``, ``λ₂ = 1``).

Data: scikit-learn's bundled ``digits`` (offline) by default, or ``--data``
(``.npz`` with arrays ``X``, ``y`` and optionally ``X_test``, ``y_test``; or
``.csv``, one example per row, last column the label, an optional header
line).  Without a test set the examples are split once with a fixed
permutation (seed 0, independent of ``--seed``, so every seed sees the same
split).  Labels are mapped to ``0..c-1`` (sorted distinct values of train and
test together); features are standardised with the training mean and standard
deviation (constant features are only centred).

Defaults: ``q = 0.5``; ``l2 = 0.003`` (chosen so that on digits, with the
other defaults, the final ``‖Wᵀ‖_{2,1}`` of ``l2`` is close to that of
``dropout``, so their μ and ν compare at comparable norm); 200 epochs of
SGD, ``lr = 0.05``, minibatch 32; ``B = 2 log c`` (twice the loss of the
uniform predictor, so truncation only touches confidently wrong
predictions); ``δ = 0.05``; ``A = ‖Wᵀ‖_{2,1}`` of the current ``W``.

Outputs in ``--out`` (written atomically): ``bound.csv`` (one row per
regularizer and evaluated epoch), ``bound.json`` (configuration, histories,
final rows) and ``bound.png`` (one panel per quantity vs epoch, one line per
regularizer), plus a table of the final rows on stdout.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dropcheck import DataError, DropcheckError
from dropcheck import bound as bd
from dropcheck import linear

from ..pipeline.files import atomic_write_bytes

REGULARIZERS = ("none", "l2", "dropout", "explicit", "explicit+implicit")

# quantities recorded per evaluated epoch, in CSV column order
FIELDS = (
    "regularizer", "epoch", "train_loss", "train_acc", "test_acc",
    "weight_norm", "frobenius_norm", "mu", "nu", "theta",
    "term_mu", "term_nu", "term_third", "zeta", "rhs",
    "train_truncated_loss", "test_truncated_loss", "observed_gap",
    "explicit_penalty",
)


# ---------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="a .npz (X, y[, X_test, y_test]) or .csv (last column = label) file; "
                             "default: scikit-learn's bundled digits")
    parser.add_argument("--out", type=Path, default=Path("bound_out"),
                        help="output folder (default ./bound_out)")
    parser.add_argument("--epochs", type=int, default=200, help="training epochs (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of minibatch order and noise (default 0)")
    parser.add_argument("--q", type=float, default=0.5, help="input dropout probability q (default 0.5)")
    parser.add_argument("--l2", type=float, default=0.003,
                        help="strength of the l2 regularizer (l2/2)‖W‖_F² (default 0.003: on digits its "
                             "final ‖Wᵀ‖_{2,1} is close to dropout's at q = 0.5)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD step size (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="minibatch size; 0 = full batch (default 32)")
    parser.add_argument("--B", type=float, default=None, help="truncation level B (default 2·log c)")
    parser.add_argument("--delta", type=float, default=0.05, help="failure probability δ (default 0.05)")
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="held-out fraction when the data have no test set (default 0.5)")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (default 1)")
    parser.add_argument("--regularizers", type=str, default=",".join(REGULARIZERS),
                        help=f"comma-separated subset of {','.join(REGULARIZERS)}")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG figure")


def _check_args(args) -> list[str]:
    if args.epochs < 1:
        raise DropcheckError(f"--epochs must be ≥ 1, got {args.epochs}")
    if args.eval_every < 1:
        raise DropcheckError(f"--eval-every must be ≥ 1, got {args.eval_every}")
    if args.batch_size < 0:
        raise DropcheckError(f"--batch-size must be ≥ 0 (0 = full batch), got {args.batch_size}")
    if not (0.0 <= args.q < 1.0):
        raise DropcheckError(f"--q must lie in [0, 1), got {args.q}")
    if not (math.isfinite(args.l2) and args.l2 >= 0):
        raise DropcheckError(f"--l2 must be a finite number ≥ 0, got {args.l2}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DropcheckError(f"--lr must be a finite number > 0, got {args.lr}")
    if not (0.0 < args.test_fraction < 1.0):
        raise DropcheckError(f"--test-fraction must lie in (0, 1), got {args.test_fraction}")
    if args.B is not None and not (math.isfinite(args.B) and args.B > 0):
        raise DropcheckError(f"--B must be a finite number > 0, got {args.B}")
    if not (0.0 < args.delta < 1.0):
        raise DropcheckError(f"--delta must lie in (0, 1), got {args.delta}")
    regs = [r.strip() for r in str(args.regularizers).split(",") if r.strip()]
    bad = [r for r in regs if r not in REGULARIZERS]
    if bad or not regs:
        raise DropcheckError(f"unknown regularizer(s) {bad}; expected a comma-separated subset of {list(REGULARIZERS)}")
    return list(dict.fromkeys(regs))


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def _labels_as_int(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{what} must be one-dimensional (one label per example), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) or y.dtype == bool:
        yf = y.astype(np.float64)
        if not np.all(np.isfinite(yf)) or not np.all(yf == np.round(yf)):
            raise DataError(f"{what} must be integer class labels; found non-integer or non-finite values")
        return yf.astype(np.int64)
    raise DataError(f"{what} must be integer class labels, got dtype {y.dtype}")


def _features(X: np.ndarray, what: str) -> np.ndarray:
    if X.dtype == object or not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DataError(f"{what} must be numeric, got dtype {X.dtype}")
    if X.ndim != 2:
        raise DataError(f"{what} must be two-dimensional (examples × features), got shape {X.shape}")
    X = X.astype(np.float64)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{what} contains non-finite values (NaN or inf)")
    return X


def _load_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if "X" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: a .npz data file needs arrays 'X' and 'y'; found {sorted(arrays)}")
    if ("X_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: give both 'X_test' and 'y_test', or neither")
    X = _features(arrays["X"], f"{path}: X")
    y = _labels_as_int(arrays["y"], f"{path}: y")
    if X.shape[0] != y.shape[0]:
        raise DataError(f"{path}: X has {X.shape[0]} rows but y has {y.shape[0]} labels")
    if "X_test" in arrays:
        Xt = _features(arrays["X_test"], f"{path}: X_test")
        yt = _labels_as_int(arrays["y_test"], f"{path}: y_test")
        if Xt.shape[0] != yt.shape[0]:
            raise DataError(f"{path}: X_test has {Xt.shape[0]} rows but y_test has {yt.shape[0]} labels")
        if Xt.shape[1] != X.shape[1]:
            raise DataError(f"{path}: X_test has {Xt.shape[1]} features but X has {X.shape[1]}")
        return X, y, Xt, yt
    return X, y, None, None


def _load_csv(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable UTF-8 text file ({exc})") from None
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if not lines:
        raise DataError(f"{path}: the CSV file is empty")

    def parse(ln: str):
        return [float(v) for v in ln.split(",")]

    try:
        parse(lines[0][1])
    except ValueError:
        lines = lines[1:]  # a header line
    rows = []
    for lineno, ln in lines:
        try:
            rows.append(parse(ln))
        except ValueError:
            raise DataError(f"{path}: line {lineno} is not a row of comma-separated numbers: {ln[:60]!r}") from None
    if not rows:
        raise DataError(f"{path}: the CSV file has a header but no data rows")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: rows have different numbers of columns {sorted(widths)}")
    if widths.pop() < 2:
        raise DataError(f"{path}: need at least one feature column and the label column")
    A = np.asarray(rows, dtype=np.float64)
    X = _features(A[:, :-1], f"{path}: features")
    y = _labels_as_int(A[:, -1], f"{path}: label column")
    return X, y, None, None


def load_data(path: Optional[Path], test_fraction: float = 0.5):
    """Returns ``(Xtr, ytr, Xte, yte, name)``: float64 standardised features,
    int64 labels in ``0..c-1``.  Raises :class:`DataError` for bad files."""
    if path is None:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X, y, Xt, yt, name = X.astype(np.float64), y.astype(np.int64), None, None, "digits (scikit-learn)"
    else:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            X, y, Xt, yt = _load_npz(path)
        elif suffix == ".csv":
            X, y, Xt, yt = _load_csv(path)
        else:
            raise DataError(f"data file {path}: unknown format {suffix!r}; expected .npz or .csv")
        name = path.name
    if Xt is None:
        n = X.shape[0]
        n_test = int(round(test_fraction * n))
        if n - n_test < 3 or n_test < 1:
            raise DataError(f"{name}: {n} examples are too few to split into ≥ 3 training and ≥ 1 test examples")
        perm = np.random.default_rng(0).permutation(n)
        Xt, yt = X[perm[:n_test]], y[perm[:n_test]]
        X, y = X[perm[n_test:]], y[perm[n_test:]]
    if X.shape[0] < 3:
        raise DataError(f"{name}: need at least 3 training examples (Theorem 4.1 uses log log n), got {X.shape[0]}")
    if Xt.shape[0] < 1:
        raise DataError(f"{name}: the test set is empty")
    classes = np.unique(np.concatenate([y, yt]))
    if classes.size < 2:
        raise DataError(f"{name}: need at least 2 classes, found {classes.size}")
    y, yt = np.searchsorted(classes, y), np.searchsorted(classes, yt)
    mean, std = X.mean(0), X.std(0)
    std = np.where(std > 0, std, 1.0)
    return (X - mean) / std, y.astype(np.int64), (Xt - mean) / std, yt.astype(np.int64), name


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def _minibatch_loss(W, Xb, yb, reg: str, q: float, l2: float, gen: torch.Generator):
    """The training objective of ``reg`` on one minibatch (before any noise)."""
    if reg == "dropout" and q > 0:
        keep = torch.bernoulli(torch.full_like(Xb, 1.0 - q), generator=gen)
        Xb = Xb * keep / (1.0 - q)
    loss = torch.nn.functional.cross_entropy(Xb @ W.T, yb)
    if reg == "l2":
        loss = loss + 0.5 * l2 * (W * W).sum()
    elif reg in ("explicit", "explicit+implicit"):
        loss = loss + linear.explicit_penalty_linear(W, Xb, q)
    return loss


def _evaluate(W, Xtr, ytr, Xte, yte, B, delta, q, reg, epoch) -> dict:
    with torch.no_grad():
        Wd = W.detach()
        t = bd.theorem_4_1(Wd, Xtr, ytr, B=B, delta=delta, X_test=Xte, y_test=yte)
        Ztr, Zte = Xtr @ Wd.T, Xte @ Wd.T
        row = {
            "regularizer": reg,
            "epoch": epoch,
            "train_loss": float(torch.nn.functional.cross_entropy(Ztr, ytr)),
            "train_acc": float((Ztr.argmax(1) == ytr).double().mean()),
            "test_acc": float((Zte.argmax(1) == yte).double().mean()),
            "frobenius_norm": float(torch.linalg.norm(Wd)),
            "explicit_penalty": float(linear.explicit_penalty_linear(Wd, Xtr, q)),
        }
    d = t.as_dict()
    for k in FIELDS:
        if k not in row:
            row[k] = d[k]
    return row


def train_one(reg: str, Xtr, ytr, Xte, yte, *, epochs: int, seed: int, q: float, l2: float,
              lr: float, batch_size: int, B: float, delta: float, eval_every: int = 1,
              progress=None) -> tuple[torch.Tensor, list[dict]]:
    """SGD on ``z = W x`` with regularizer ``reg``; returns ``(W, history)``."""
    n, d = Xtr.shape
    c = int(max(int(ytr.max()), int(yte.max())) + 1)
    W = torch.zeros(c, d, dtype=torch.float64, requires_grad=True)
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    bs = n if batch_size in (0, None) or batch_size >= n else batch_size
    history = [_evaluate(W, Xtr, ytr, Xte, yte, B, delta, q, reg, 0)]
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=order_gen)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            Xb, yb = Xtr[idx], ytr[idx]
            loss = _minibatch_loss(W, Xb, yb, reg, q, l2, noise_gen)
            (g,) = torch.autograd.grad(loss, W)
            if reg == "explicit+implicit" and q > 0:
                g = g + linear.implicit_noise_linear(W.detach(), Xb, yb, q, generator=noise_gen)
            with torch.no_grad():
                W -= lr * g
        if not torch.isfinite(W).all():
            raise DropcheckError(f"training with {reg!r} diverged at epoch {epoch}; lower --lr (now {lr})")
        if epoch % eval_every == 0 or epoch == epochs:
            history.append(_evaluate(W, Xtr, ytr, Xte, yte, B, delta, q, reg, epoch))
        if progress is not None:
            progress.update(1)
    return W.detach(), history


# ---------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------


def _csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS))
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (repr(r[k]) if isinstance(r[k], float) else r[k])) for k in FIELDS})
    return buf.getvalue().encode()


TABLE_COLS = (
    ("regularizer", "regularizer", "{:<18}"),
    ("train_acc", "train acc", "{:>9.4f}"),
    ("test_acc", "test acc", "{:>8.4f}"),
    ("weight_norm", "‖Wᵀ‖₂,₁", "{:>9.3f}"),
    ("mu", "μ", "{:>9.4f}"),
    ("nu", "ν", "{:>9.4f}"),
    ("term_mu", "term_μ", "{:>10.4g}"),
    ("term_nu", "term_ν", "{:>10.4g}"),
    ("term_third", "term_3", "{:>10.4g}"),
    ("zeta", "ζ", "{:>8.4f}"),
    ("rhs", "RHS", "{:>10.4g}"),
    ("observed_gap", "obs. gap", "{:>9.4f}"),
)


def format_table(rows: list[dict]) -> str:
    head = "  ".join(fmt.replace(".4f", "").replace(".3f", "").replace(".4g", "").format(label)
                     for _, label, fmt in TABLE_COLS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(fmt.format(r[k]) for k, _, fmt in TABLE_COLS))
    return "\n".join(lines)


# (y key, title, log y, x key)
PANELS = (
    ("mu", "μ = mean ‖p − e_y‖₂", False),
    ("nu", "ν = mean (1 − ‖p‖₂²)", False),
    ("weight_norm", "‖Wᵀ‖₂,₁  (= A)", False),
    ("term_mu", "term_μ = (Aμ)^(2/3) (θB)^(1/3) / n^(1/3)", True),
    ("term_nu", "term_ν = sqrt(A² B ν θ / n)", True),
    ("term_third", "term_3 = BA²θ / (n (log²(BA²θ/(νn)) + 1))", True),
    ("rhs", "RHS = term_μ + term_ν + term_3 + ζ", True),
    ("observed_gap", "observed gap  E_test ℓ̄ − 1.01 E_train ℓ̄", False),
    ("test_acc", "test accuracy", False),
    ("train_loss", "training loss (clean, unregularized)", True),
    ("mu", "μ vs ‖Wᵀ‖₂,₁ (compare at equal norm)", True, "weight_norm"),
    ("nu", "ν vs ‖Wᵀ‖₂,₁ (compare at equal norm)", True, "weight_norm"),
)


def at_common_norm(histories: dict) -> dict:
    """μ and ν of each regularizer at one common value ``A₀`` of ``‖Wᵀ‖_{2,1}``.

    ``A₀`` is the smallest final ``‖Wᵀ‖_{2,1}`` over the regularizers; each
    trajectory (which starts at ``W = 0``) is linearly interpolated at its
    first evaluated crossing of ``A₀``.  This compares the data-dependent
    terms at comparable norm, the comparison Theorem 4.1 suggests.
    Returns ``{"norm": A₀, "mu": {reg: …}, "nu": {reg: …}, "epoch": {reg: …}}``.
    """
    a0 = min(h[-1]["weight_norm"] for h in histories.values())
    out = {"norm": a0, "mu": {}, "nu": {}, "epoch": {}}
    for reg, hist in histories.items():
        for prev, cur in zip(hist, hist[1:]):
            if cur["weight_norm"] >= a0:
                span = cur["weight_norm"] - prev["weight_norm"]
                t = 1.0 if span <= 0 else (a0 - prev["weight_norm"]) / span
                for k in ("mu", "nu", "epoch"):
                    out[k][reg] = prev[k] + t * (cur[k] - prev[k])
                break
        else:
            for k in ("mu", "nu", "epoch"):
                out[k][reg] = hist[-1][k]
    return out


def _figure_bytes(histories: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 4, figsize=(18, 11), constrained_layout=True)
    for ax, panel in zip(axes.flat, PANELS):
        key, label, logy = panel[:3]
        xkey = panel[3] if len(panel) > 3 else "epoch"
        for reg, hist in histories.items():
            pts = [(r[xkey], r[key]) for r in hist if r[key] is not None]
            if logy:
                pts = [(e, v) for e, v in pts if v > 0]
            if pts:
                e, v = zip(*pts)
                ax.plot(e, v, label=reg, lw=1.6)
        if logy:
            ax.set_yscale("log")
        ax.set_title(label, fontsize=11)
        ax.set_xlabel("‖Wᵀ‖₂,₁" if xkey == "weight_norm" else "epoch")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=11, frameon=False)
    fig.suptitle(title, fontsize=13)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


def _train_every_regularizer(regs, Xtr, ytr, Xte, yte, args, B: float) -> dict[str, list[dict]]:
    """One SGD run per regularizer from the same start; returns each run's history."""
    from tqdm import tqdm

    histories: dict[str, list[dict]] = {}
    # The matrices are tiny (minibatch × 64): one thread is fastest, and
    # several threads on a busy machine were measured ~50x slower (spin-waits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tqdm(total=len(regs) * args.epochs, desc="bound", unit="epoch") as bar:
            for reg in regs:
                bar.set_description(f"bound [{reg}]")
                _, hist = train_one(reg, Xtr, ytr, Xte, yte, epochs=args.epochs, seed=args.seed, q=args.q,
                                    l2=args.l2, lr=args.lr, batch_size=args.batch_size, B=B,
                                    delta=args.delta, eval_every=args.eval_every, progress=bar)
                histories[reg] = hist
    finally:
        torch.set_num_threads(threads)
    return histories


def _write_outputs(out: Path, payload: dict, t0: float, title: Optional[str]) -> list[str]:
    """bound.csv (every history row), bound.json (payload + seconds) and, with
    a title, bound.png."""
    rows = [r for hist in payload["history"].values() for r in hist]
    atomic_write_bytes(out / "bound.csv", _csv_bytes(rows))
    payload = {**payload, "seconds": time.perf_counter() - t0}
    atomic_write_bytes(out / "bound.json", json.dumps(payload, indent=1, allow_nan=False).encode())
    written = ["bound.csv", "bound.json"]
    if title is not None:
        atomic_write_bytes(out / "bound.png", _figure_bytes(payload["history"], title))
        written.append("bound.png")
    return written


def run(args) -> int:
    regs = _check_args(args)
    t0 = time.perf_counter()
    Xtr_np, ytr_np, Xte_np, yte_np, name = load_data(args.data, args.test_fraction)
    Xtr, ytr = torch.from_numpy(Xtr_np), torch.from_numpy(ytr_np)
    Xte, yte = torch.from_numpy(Xte_np), torch.from_numpy(yte_np)
    n, d = Xtr.shape
    c = int(max(int(ytr.max()), int(yte.max())) + 1)
    B = 2.0 * math.log(c) if args.B is None else float(args.B)
    lam = linear.dropout_lambda(args.q)
    config = {
        "dataset": name, "n_train": n, "n_test": int(Xte.shape[0]), "classes": c, "features": d,
        "q": args.q, "explicit_lambda": lam, "l2": args.l2, "lr": args.lr,
        "batch_size": args.batch_size if 0 < args.batch_size < n else n,
        "epochs": args.epochs, "seed": args.seed, "B": B, "delta": args.delta, "constant": 1.0,
        "regularizers": regs, "theta": bd.theta(Xtr, c), "zeta": bd.zeta(B, args.delta, n),
    }
    print(f"dropcheck bound: {name}: n_train={n}, n_test={config['n_test']}, c={c}, d={d}")
    print(f"  q={args.q} (explicit λ=q/(2(1-q))={lam:.4g}), l2={args.l2}, lr={args.lr}, "
          f"batch={config['batch_size']}, epochs={args.epochs}, seed={args.seed}")
    print(f"  B={B:.4g} (ℓ̄ = min(B, ℓ)), δ={args.delta}, θ={config['theta']:.4g}, ζ={config['zeta']:.4g}, "
          f"A=‖Wᵀ‖₂,₁ of the current W, constant=1")

    histories = _train_every_regularizer(regs, Xtr, ytr, Xte, yte, args, B)
    final = [histories[r][-1] for r in regs]

    print()
    print(f"Theorem 4.1 terms after {args.epochs} epochs (A = ‖Wᵀ‖₂,₁, constant 1):")
    print(format_table(final))

    common = at_common_norm(histories)
    print(f"\nμ and ν at the common norm ‖Wᵀ‖₂,₁ = {common['norm']:.3f} (smallest final norm; "
          f"interpolated along each trajectory):")
    for reg in regs:
        print(f"  {reg:<18} μ={common['mu'][reg]:.4f}  ν={common['nu'][reg]:.4f}  (epoch ≈ {common['epoch'][reg]:.1f})")

    out = Path(args.out)
    payload = {"config": config, "final": {r["regularizer"]: r for r in final}, "at_common_norm": common,
               "history": histories}
    title = (f"Theorem 4.1 along training — {name}: n={n}, c={c}, d={d}; "
             f"q={args.q}, l2={args.l2}, B={B:.3g}, δ={args.delta}, ζ={config['zeta']:.3g}")
    written = _write_outputs(out, payload, t0, None if args.no_plot else title)
    print(f"\nwrote {', '.join(str(out / w) for w in written)} in {time.perf_counter() - t0:.1f} s")
    return 0
