"""Small float64 models that drop out the way real libraries do.

Each builder returns a ``Zoo`` entry: the model, its inputs (a dict of
keyword inputs for the Hugging Face models), targets aligned with the
logits (``-100`` where there is no target).  The ground truth ``E[train-mode loss] - eval-mode loss`` with the model's own
random draws is ``dropcheck.testing.own_dropout_gap``, which uses none of
dropcheck's analytic machinery.  Nothing here calls dropcheck.

The Hugging Face models are built from tiny configs (no weights are ever
downloaded; ``HF_HUB_OFFLINE=1``) with the default attention implementation
(``sdpa``).  timm and torchvision are not importable beside this torch
build, so ``DropPath`` and ``StochasticDepth`` below are written here with
the class names, attributes and forward semantics of timm's
``timm.layers.DropPath`` and torchvision's ``torchvision.ops.StochasticDepth``
(read from their sources; dropcheck recognises them by name and attributes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DT = torch.float64


@dataclass
class Zoo:
    name: str
    model: nn.Module
    inputs: object
    targets: torch.Tensor
    # central-difference step and the agreement it reaches with the JVP route
    # (float64 throughout: 1e-5 and 1e-6; T5 below computes in float32 inside)
    fd_eps: float = 1e-5
    fd_rtol: float = 1e-6


def _scale_(model: nn.Module, std: float, seed: int) -> None:
    """Re-draw every weight matrix N(0, std²) (biases, norms untouched): a
    tiny model at its default initialisation is nearly linear and its dropout
    gap too small to test against Monte Carlo."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _lm_targets(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets, -100 at the last position (as HF shifts labels)."""
    y = torch.full_like(ids, -100)
    y[:, :-1] = ids[:, 1:]
    return y


def gpt2(seed: int = 0, p: float = 0.3, std: float = 0.5, attn_only: bool = False) -> Zoo:
    """``attn_only``: dropout only inside attention (through SDPA's
    ``dropout_p``): a dropcheck that missed it would find no site at all."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    po = 0.0 if attn_only else p
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=8, resid_pdrop=po,
                     embd_pdrop=po, attn_pdrop=p, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).to(DT)
    _scale_(model, std, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    return Zoo("gpt2_attn_only" if attn_only else "gpt2", model, {"input_ids": ids}, _lm_targets(ids))


def bert(seed: int = 0, p: float = 0.3, std: float = 0.5) -> Zoo:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=20, max_position_embeddings=8, hidden_dropout_prob=p,
                     attention_probs_dropout_prob=p, pad_token_id=0)
    model = BertForMaskedLM(cfg).to(DT)
    _scale_(model, std, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, 11, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding: attention masked, no target there
    y = torch.randint(0, 11, ids.shape, generator=g)
    y[:, ::3] = -100  # masked-LM style: only some positions have targets
    y[1, -2:] = -100
    return Zoo("bert", model, {"input_ids": ids, "attention_mask": mask}, y)


def t5(seed: int = 0, p: float = 0.3, std: float = 0.5) -> Zoo:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=11, d_model=16, d_kv=8, d_ff=20, num_layers=1, num_decoder_layers=1,
                   num_heads=2, dropout_rate=p, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(cfg).to(DT)
    _scale_(model, std, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, 11, (2, 5), generator=g)
    dec = torch.randint(1, 11, (2, 4), generator=g)
    # T5LayerNorm computes its variance in float32 even in a float64 model, so
    # finite differences see float32 rounding (~6e-8 / eps): measured relative
    # error of fd against the JVP 4.9e-3 at eps = 1e-5, 1.3e-3 at 1e-4, 8.7e-6
    # at 1e-3 (ξ: 6.9e-3, 7.1e-4, 7.9e-5); at 3e-3 the ReLU kinks take over.
    return Zoo("t5", model, {"input_ids": ids, "decoder_input_ids": dec}, _lm_targets(dec),
               fd_eps=1e-3, fd_rtol=1e-3)


class EncoderLM(nn.Module):
    """Token model on ``nn.TransformerEncoderLayer`` (attention dropout inside
    ``nn.MultiheadAttention``, three ``nn.Dropout`` modules) and a separate
    ``nn.MultiheadAttention`` called with ``need_weights=False`` (its dropout
    then goes through ``scaled_dot_product_attention``)."""

    def __init__(self, vocab=7, d=8, p=0.3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=p, batch_first=True)
        self.mha = nn.MultiheadAttention(d, 2, dropout=p, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        h = self.enc(self.emb(x))
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(h + a)


def encoder_layer(seed: int = 0, p: float = 0.3, std: float = 0.6, attn_only: bool = False) -> Zoo:
    """``attn_only``: only the two attention dropouts (the ``nn.Dropout``
    modules at p = 0)."""
    torch.manual_seed(seed)
    model = EncoderLM(p=p).to(DT)
    if attn_only:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    _scale_(model, std, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, 7, (2, 4), generator=g)
    return Zoo("encoder_layer_attn_only" if attn_only else "encoder_layer", model, x,
               torch.randint(0, 7, (2, 4), generator=g))


# -- stochastic depth, with timm's and torchvision's names and semantics -------


# timm's DropPath(drop_prob, scale_by_keep): the testing kit's stand-in (one Bernoulli draw per example,
# scaled by 1/(1-q) in training mode), the same class name and attributes dropcheck recognises
from dropcheck.testing._networks import DropPath  # noqa: E402


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, mode)``: ``"row"`` one draw per
    example, ``"batch"`` one draw for the whole batch, kept values / (1-p)."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        size = [x.shape[0]] + [1] * (x.dim() - 1) if self.mode == "row" else [1] * x.dim()
        noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1.0 - self.p)
        return x * (noise / (1.0 - self.p))  # torchvision's order: the scaled mask, then the product


class ResidualSD(nn.Module):
    """Residual MLP: stem, BatchNorm, three residual blocks whose branches end
    in timm ``DropPath``, torchvision ``StochasticDepth("row")`` and
    ``StochasticDepth("batch")``, one ``nn.Dropout`` before the head."""

    def __init__(self, d_in=5, d=8, c=4, q=(0.3, 0.3, 0.2), p=0.2, drop_path=None, stochastic_depth=None):
        super().__init__()
        drop_path, stochastic_depth = drop_path or DropPath, stochastic_depth or StochasticDepth
        self.stem = nn.Linear(d_in, d)
        self.bn = nn.BatchNorm1d(d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh()) for _ in q)
        self.drops = nn.ModuleList([drop_path(q[0]), stochastic_depth(q[1], "row"),
                                    stochastic_depth(q[2], "batch")])
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(d, c)

    def forward(self, x):
        h = torch.tanh(self.bn(self.stem(x)))
        for blk, dp in zip(self.blocks, self.drops):
            h = h + dp(blk(h))
        return self.head(self.drop(h))


def residual_sd(seed: int = 0, std: float = 1.0, real: bool = False) -> Zoo:
    """``real``: the blocks end in timm's own ``DropPath`` and torchvision's own
    ``StochasticDepth`` (both importable on a GPU machine's image, not beside
    torch 2.13 on CI) instead of this file's copies of them."""
    classes = {}
    if real:
        from timm.layers import DropPath as TimmDropPath
        from torchvision.ops import StochasticDepth as TvStochasticDepth

        classes = dict(drop_path=TimmDropPath, stochastic_depth=TvStochasticDepth)
    torch.manual_seed(seed)
    model = ResidualSD(**classes).to(DT)
    _scale_(model, std, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 5, generator=g, dtype=DT)
    with torch.no_grad():  # running statistics that are not the batch's own
        model.bn.running_mean.copy_(0.3 * torch.randn(8, generator=g, dtype=DT))
        model.bn.running_var.copy_(0.5 + torch.rand(8, generator=g, dtype=DT))
    return Zoo("residual_sd_real" if real else "residual_sd", model, x, torch.randint(0, 4, (6,), generator=g))


def _token_batch(seed: int, n: int = 2, t: int = 5, vocab: int = 11):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    y = torch.randint(0, vocab, (n, t), generator=g)
    y[0, 0] = -100
    return ids, y, g


def opt(seed: int = 0, attn: str = "sdpa", std: float = 0.5, dropout=0.3, attention_dropout=0.1) -> Zoo:
    """Tiny OPT: every dropout functional (``F.dropout`` with ``self.dropout``
    in the layers, attention dropout through eager or SDPA attention)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=11, hidden_size=8, num_hidden_layers=2, ffn_dim=16, num_attention_heads=2,
                    max_position_embeddings=16, word_embed_proj_dim=8, dropout=dropout,
                    attention_dropout=attention_dropout)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg).to(DT)
    _scale_(model, std, seed)
    ids, y, _ = _token_batch(seed)
    return Zoo(f"opt_{attn}", model, {"input_ids": ids}, y)


def bart(seed: int = 0, attn: str = "sdpa", std: float = 0.5, dropout=0.3, activation_dropout=0.1,
         attention_dropout=0.2) -> Zoo:
    """Tiny BART (encoder and decoder): ``dropout``, ``activation_dropout`` and
    ``attention_dropout`` all reach ``F.dropout`` / attention from one layer module."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=11, d_model=8, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16,
                     decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
                     max_position_embeddings=16, dropout=dropout, activation_dropout=activation_dropout,
                     attention_dropout=attention_dropout)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(cfg).to(DT)
    _scale_(model, std, seed)
    ids, y, g = _token_batch(seed)
    dec = torch.randint(0, 11, ids.shape, generator=g)
    return Zoo(f"bart_{attn}", model, {"input_ids": ids, "decoder_input_ids": dec}, y)


def llama(seed: int = 0, attn: str = "sdpa", std: float = 0.5, attention_dropout=0.3) -> Zoo:
    """Tiny Llama: attention dropout only (``self.attention_dropout``); RMSNorm
    computes in float32 inside the float64 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                      attention_dropout=attention_dropout)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(DT)
    if std is not None:
        _scale_(model, std, seed)
    ids, y, _ = _token_batch(seed)
    return Zoo(f"llama_{attn}", model, {"input_ids": ids}, y)


def cnn(seed: int = 0) -> Zoo:
    """A small CNN: ``Dropout2d`` between convolutions, BatchNorm (eval-mode
    statistics in every pass), dropout before the classifier."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout2d(0.2),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Dropout(0.3), nn.Linear(6, 4)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(8, 2, 6, 6, generator=g, dtype=DT)
    return Zoo("cnn", model, x, torch.randint(0, 4, (8,), generator=g))


# models whose dropout is all functional (not in BUILDERS: test_functional_sites_hf.py uses them)
FUNCTIONAL_HF = {"opt": opt, "bart": bart, "llama": llama}


BUILDERS = {"gpt2": gpt2, "bert": bert, "t5": t5, "encoder_layer": encoder_layer, "residual_sd": residual_sd,
            "residual_sd_real": lambda: residual_sd(real=True)}
# packages a builder needs beyond the test extra; skipped where absent, also on CI (PyPI's torchvision
# breaks beside torch 2.13, and timm imports torchvision)
OPTIONAL = {"residual_sd_real": ("timm", "torchvision")}
ATTN_ONLY = {"gpt2_attn_only": lambda: gpt2(attn_only=True),
             "encoder_layer_attn_only": lambda: encoder_layer(attn_only=True)}
HF = {"gpt2", "bert", "t5", "gpt2_attn_only"}


def wide_last_layer_net(seed: int = 0):
    """``(model, x, y)``: dropout (q = 0.05) only on the input of the last
    layer of a 64-wide tanh net with small last weights, in float64, on 8
    examples: where the second-order picture holds (``R_taylor = λ R_approx``
    exactly at a last-layer site)."""
    g = torch.Generator().manual_seed(seed)
    wide = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Dropout(0.05), nn.Linear(64, 3)).double()
    with torch.no_grad():
        wide[3].weight.mul_(0.3)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return wide, x, y
