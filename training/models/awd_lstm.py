"""AWD-LSTM-style language model whose every dropout is a dropcheck site.

Merity, Keskar & Socher (2018), as used by Wei, Kakade & Ma (2020):
embedding (``emb``), ``layers`` LSTM layers (``hidden`` units, the last one
back to ``emb`` when the weights are tied), tied decoder.  Dropout sites and
their groups (the groups carry the per-group coefficients of the update
rules, see ``rules.py``):

===========  =================================  ===========================  ==========
group        module                             noise                        paper name
===========  =================================  ===========================  ==========
embedding    ``drop_emb``  (LockedDropout)      embedding output, per        dropouti
                                                sequence and unit
hidden       ``drop_hidden.<l>`` (LockedDropout) between LSTM layers         dropouth
output       ``drop_out`` (LockedDropout)       last layer's output          dropout
weights      ``rnns.<l>.wdrop`` (DropConnect)   recurrent weights ``w_hh``,  wdrop
                                                one mask per forward pass
rows         ``drop_rows`` (EmbeddingRowDropout) whole rows of the           dropoute
                                                embedding matrix
===========  =================================  ===========================  ==========

The paper's setting puts ``q = 0.4`` on the first four groups; its
regularizers (and the official code's) cover exactly those four, so the
row dropout defaults to ``q = 0`` in the configs.  It is nevertheless a full
analytic site: dropping whole rows of the embedding weight is DropConnect on
that weight with mask shape ``(V, 1)`` (``EmbeddingRowDropout``), which
dropcheck's mask-shape machinery handles like any weight site.

The embedding and decoder share their weight (tied); row dropout acts on
the embedding lookup only, the decoder always uses the clean weight (as in
AWD-LSTM's ``embedded_dropout``).

LSTM backends (``LSTMLayer``):

- ``"loop"``: a Python loop over time; plain autograd, so double backward
  works everywhere (needed by the autograd estimators of ``R_approx`` and
  ``ξ_approx``).
- ``"fused"``: one ``torch._VF.lstm`` call per layer (cuDNN on GPU).  cuDNN
  has no double backward, so on GPU it serves first-order rules and the
  finite-difference estimators only; on CPU ATen's LSTM is composite and
  double backward works too.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dropcheck import DropcheckError, SiteSpec
from dropcheck import DropConnect, LockedDropout

from ..pipeline.lm import Arch, LanguageModel, StatefulLM, detach_state

BACKENDS = ("loop", "fused")
INITS = ("uniform", "xavier")
GROUPS = ("embedding", "hidden", "output", "weights", "rows")  # the site groups (ARCH.groups)

# cuDNN warns when the weights it gets are not one flat buffer; ours never are
# (DropConnect makes a fresh w_hh every pass), as in AWD-LSTM.
warnings.filterwarnings("ignore", message=".*RNN module weights are not part of single contiguous chunk.*")

Hidden = list  # [(h, c)] per layer, each (B, H_l)

__all__ = [
    "BACKENDS",
    "INITS",
    "GROUPS",
    "EmbeddingRowDropout",
    "LSTMLayer",
    "AWDLSTM",
    "StatefulLM",
    "site_groups",
    "detach_hidden",
    "ARCH",
]


class EmbeddingRowDropout(DropConnect):
    """Embedding dropout (Gal & Ghahramani 2016; AWD-LSTM's ``dropoute``).

    ``forward(W)`` with ``W`` of shape ``(V, D)`` drops whole rows (words):
    ``W ⊙ m/(1-q)`` with ``m`` of shape ``(V, 1)``, one mask per forward
    pass shared by every occurrence of a word in the batch.  For dropcheck
    it is a DropConnect (weight) site whose noise units are the rows; only
    the mask shape differs (``DropConnect.forward`` draws its training-mode
    mask with ``self.mask_shape``).
    """

    def mask_shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return (w.shape[0],) + (1,) * (w.dim() - 1)


class LSTMLayer(nn.Module):
    """One LSTM layer with explicit parameters and DropConnect on ``w_hh``.

    Gates in PyTorch's order ``(i, f, g, o)``:
    ``[i f g o] = x W_ihᵀ + b_ih + h W̃_hhᵀ + b_hh``, ``c' = σ(f) c + σ(i) tanh(g)``,
    ``h' = σ(o) tanh(c')``, where ``W̃_hh = wdrop(W_hh)`` is drawn once per
    forward pass.  Input ``(T, B, n_in)``, state ``(h, c)`` each ``(B, n_out)``;
    returns ``(output (T, B, n_out), (h_T, c_T))``.
    """

    def __init__(self, n_in: int, n_out: int, q_weights: float = 0.0, init: str = "uniform"):
        super().__init__()
        if init not in INITS:
            raise DropcheckError(f"unknown LSTM initialisation {init!r}; expected one of {list(INITS)}")
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.init = init
        self.w_ih = nn.Parameter(torch.empty(4 * n_out, n_in))
        self.w_hh = nn.Parameter(torch.empty(4 * n_out, n_out))
        self.b_ih = nn.Parameter(torch.empty(4 * n_out))
        self.b_hh = nn.Parameter(torch.empty(4 * n_out))
        self.wdrop = DropConnect(q_weights)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``"uniform"``: nn.LSTM's U(±1/sqrt(H)) for every parameter;
        ``"xavier"``: Xavier-uniform weights and zero biases, as the official
        code's analytic LSTM layer (its weights are stored transposed, which
        Xavier's symmetric bound does not see)."""
        if self.init == "xavier":
            for w in (self.w_ih, self.w_hh):
                nn.init.xavier_uniform_(w)
            for b in (self.b_ih, self.b_hh):
                nn.init.zeros_(b)
            return
        bound = 1.0 / math.sqrt(self.n_out)  # nn.LSTM's initialisation
        for p in (self.w_ih, self.w_hh, self.b_ih, self.b_hh):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, state, backend: str = "loop"):
        h, c = state
        w_hh = self.wdrop(self.w_hh)
        if backend == "fused":
            out, hT, cT = torch._VF.lstm(
                x,
                (h.unsqueeze(0), c.unsqueeze(0)),
                [self.w_ih, w_hh, self.b_ih, self.b_hh],
                True,  # has_biases
                1,  # num_layers
                0.0,  # dropout
                self.training,
                False,  # bidirectional
                False,  # batch_first
            )
            return out, (hT.squeeze(0), cT.squeeze(0))
        if backend != "loop":
            raise DropcheckError(f"unknown LSTM backend {backend!r}; expected one of {list(BACKENDS)}")
        xw = F.linear(x, self.w_ih, self.b_ih)  # (T, B, 4H), all steps at once
        outs = []
        for t in range(x.shape[0]):
            gates = xw[t] + F.linear(h, w_hh, self.b_hh)
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs), (h, c)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}"


class AWDLSTM(LanguageModel):
    """The language model (a ``training.pipeline.lm.LanguageModel``): ``forward(tokens
    (T, B), hidden)`` -> ``(logits (T, B, V), new_hidden)``; ``hidden=None``
    starts from zeros (``init_state``); ``decoder`` is the tied ``nn.Linear``.

    ``q``: drop probabilities per group (module docstring); ``backend``:
    ``"loop"`` or ``"fused"`` (can be changed later through ``.backend``);
    ``lstm_init``: ``"uniform"`` (nn.LSTM's) or ``"xavier"`` (the official
    code's: Xavier weights, zero biases; ``LSTMLayer.reset_parameters``).
    """

    def __init__(
        self,
        vocab: int,
        emb: int = 400,
        hidden: int = 1150,
        layers: int = 3,
        *,
        q_embedding: float = 0.4,
        q_hidden: float = 0.4,
        q_output: float = 0.4,
        q_weights: float = 0.4,
        q_rows: float = 0.0,
        tie: bool = True,
        backend: str = "loop",
        lstm_init: str = "uniform",
    ):
        super().__init__()
        if layers < 1:
            raise DropcheckError(f"layers must be >= 1, got {layers}")
        if backend not in BACKENDS:
            raise DropcheckError(f"unknown LSTM backend {backend!r}; expected one of {list(BACKENDS)}")
        self.vocab, self.emb, self.hidden_size, self.layers, self.tie = vocab, emb, hidden, layers, tie
        self.backend = backend
        self.encoder = nn.Embedding(vocab, emb)
        self.drop_rows = EmbeddingRowDropout(q_rows)
        self.drop_emb = LockedDropout(q_embedding, time_dim=0)
        sizes = [emb] + [hidden] * (layers - 1) + [emb if tie else hidden]
        self.rnns = nn.ModuleList(LSTMLayer(sizes[l], sizes[l + 1], q_weights, lstm_init) for l in range(layers))
        self.drop_hidden = nn.ModuleList(LockedDropout(q_hidden, time_dim=0) for _ in range(layers - 1))
        self.drop_out = LockedDropout(q_output, time_dim=0)
        self.decoder = nn.Linear(sizes[-1], vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_state(self, bsz: int) -> Hidden:
        """Zero ``(h, c)`` for every layer."""
        w = self.encoder.weight
        return [
            (w.new_zeros(bsz, r.n_out), w.new_zeros(bsz, r.n_out)) for r in self.rnns
        ]

    init_hidden = init_state  # the name the LSTM code used before the contract

    @contextlib.contextmanager
    def record_states(self):
        """Collects the new ``(h, c)`` of every LSTM layer call in the block, in
        call order, as the hidden states of whole passes (``[(h, c)] * layers``
        each): the passes of ``center="midpoint"`` stop at the decoder, so
        ``forward`` itself never returns their state (``rules.py``, fd_mid)."""
        seen: list = []
        handles = [r.register_forward_hook(lambda mod, args, out: seen.append(out[1])) for r in self.rnns]
        passes: list = []
        try:
            yield passes
        finally:
            for h in handles:
                h.remove()
            L = len(self.rnns)
            if len(seen) % L:
                raise DropcheckError(f"expected a multiple of {L} LSTM layer calls, got {len(seen)}")
            passes.extend(seen[i : i + L] for i in range(0, len(seen), L))

    def forward(self, tokens: torch.Tensor, hidden: Optional[Hidden] = None):
        if tokens.dim() != 2:
            raise DropcheckError(f"tokens must have shape (T, B), got {tuple(tokens.shape)}")
        if hidden is None:
            hidden = self.init_hidden(tokens.shape[1])
        x = F.embedding(tokens, self.drop_rows(self.encoder.weight))
        x = self.drop_emb(x)
        new_hidden = []
        for l, rnn in enumerate(self.rnns):
            x, hl = rnn(x, hidden[l], self.backend)
            new_hidden.append(hl)
            if l < self.layers - 1:
                x = self.drop_hidden[l](x)
        x = self.drop_out(x)
        return self.decoder(x), new_hidden


detach_hidden = detach_state  # the LSTM-era name


def _awd(model: nn.Module) -> AWDLSTM:
    lm = model.lm if isinstance(model, StatefulLM) else model
    if not isinstance(lm, AWDLSTM):
        raise DropcheckError(f"expected an AWDLSTM (or a StatefulLM around one), got {type(lm).__name__}")
    return lm


def site_group(spec: SiteSpec, model: nn.Module) -> str:
    """The group of a site the core found (``dc.find_sites``), by the module
    object it is (module docstring's table), not by its name."""
    lm, m = _awd(model), spec.module
    if isinstance(m, EmbeddingRowDropout):
        return "rows"
    if isinstance(m, DropConnect):
        return "weights"
    if m is lm.drop_emb:
        return "embedding"
    if m is lm.drop_out:
        return "output"
    if any(m is d for d in lm.drop_hidden):
        return "hidden"
    raise DropcheckError(f"dropout site {spec.name!r} ({type(m).__name__}) belongs to no group of the AWD-LSTM")


def site_groups(model: nn.Module) -> dict[str, str]:
    """``{qualified module name: group}`` for every dropout site module of the
    ``AWDLSTM`` inside ``model`` (``model`` may be the LM itself or a wrapper
    such as ``StatefulLM``), whatever its ``q`` (the module list; the
    trainer's rules take the sites a forward pass calls, ``rules.site_table``)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (DropConnect, LockedDropout)):
            out[name] = site_group(SiteSpec(name, m, 0.0, "bernoulli", "position"), model)
    return out


def build(cfg, vocab: int) -> AWDLSTM:
    """The AWD-LSTM of a run config (``ARCH.build``)."""
    return AWDLSTM(
        vocab,
        cfg["emb"],
        cfg["hidden"],
        cfg["layers"],
        q_embedding=cfg["q_embedding"],
        q_hidden=cfg["q_hidden"],
        q_output=cfg["q_output"],
        q_weights=cfg["q_weights"],
        q_rows=cfg["q_rows"],
        tie=cfg["tie"],
        backend=cfg["backend"] if cfg["backend"] in BACKENDS else "fused",
        lstm_init=cfg["lstm_init"],
    )


ARCH = Arch(
    name="awd-lstm",
    build=build,
    groups=GROUPS,
    site_group=site_group,
    keys=("hidden", "q_hidden", "q_output", "q_weights", "q_rows", "backend", "lstm_init"),
    summary="AWD-LSTM (Merity et al. 2018): locked dropout on embedding, hidden and output, DropConnect on w_hh",
)
