"""A Hugging Face GPT-2 as a ``training.pipeline.lm.LanguageModel`` (config ``arch=gpt2``).

``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` (no weights, no
hub access), with the output decoder tied to the token embedding.  It plays
the part of the paper's Transformer-XL (Table 2, claim C7) at CPU scale.
Config keys: ``emb`` (``n_embd``), ``layers`` (``n_layer``), ``heads``
(``n_head``), ``bptt`` (the segment length; ``n_positions`` is the longest
segment the data can give, ``bptt`` without ``variable_bptt``), and three
drop probabilities, one per site group:

==========  ========================================  =================================
group       where                                     config key (GPT2Config)
==========  ========================================  =================================
embedding   token + position embeddings               ``q_embedding`` (``embd_pdrop``)
attention   attention probabilities ``(B, heads,      ``q_attention`` (``attn_pdrop``)
            T, T)``, one draw per weight
residual    each attention and MLP output before      ``q_residual`` (``resid_pdrop``)
            its residual add
output      the last layer's features (after          ``q_head`` (not in GPT2Config:
            ``ln_f``) entering the tied decoder        an ``nn.Dropout`` of this model)
==========  ========================================  =================================

The ``output`` site is not Hugging Face's: GPT-2 has no dropout before its
head, but the paper's Transformer-XL drops the last layer's output before its
softmax, as the AWD-LSTM's output dropout does; ``q_head = 0`` (the default)
leaves it out, and the model is then Hugging Face's alone.

Attention runs through transformers' eager implementation, whose attention
dropout is an ``F.dropout`` call that dropcheck's core sees as a functional
site; the other two are ``nn.Dropout`` modules.  The groups are read from
the sites the core finds (module type, or the attention module that made
the functional call), never from attribute names.

Segments are independent (no memory between them, unlike Transformer-XL):
the state is ``()``, and a ``bptt``-token segment sees only itself.  The
layout is time first like the rest of ``training/``: the model transposes
the ``(T, B)`` tokens for Hugging Face and its features back before the
decoder, so the logits come out ``(T, B, V)`` without a copy of the logits.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from dropcheck import DropcheckError, SiteSpec

from ..pipeline.lm import Arch, LanguageModel, StatefulLM

__all__ = ["GPT2LM", "build", "ARCH", "GROUPS"]

GROUPS = ("embedding", "attention", "residual", "output")


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the training extra brings it
        raise DropcheckError(
            "arch=gpt2 needs Hugging Face transformers: pip install 'dropcheck[train]'"
        ) from None
    return transformers


class GPT2LM(LanguageModel):
    """``forward(tokens (T, B), state=()) -> (logits (T, B, V), ())``."""

    def __init__(self, vocab: int, emb: int = 128, layers: int = 2, heads: int = 4, positions: int = 64, *,
                 q_embedding: float = 0.1, q_attention: float = 0.1, q_residual: float = 0.1,
                 q_head: float = 0.0):
        super().__init__()
        tf = _transformers()
        if emb % heads:
            raise DropcheckError(f"config key 'emb': {emb} is not divisible by heads={heads}")
        config = tf.GPT2Config(
            vocab_size=vocab, n_positions=positions, n_embd=emb, n_layer=layers, n_head=heads,
            embd_pdrop=q_embedding, attn_pdrop=q_attention, resid_pdrop=q_residual,
            tie_word_embeddings=True, use_cache=False, bos_token_id=0, eos_token_id=0,
        )
        config._attn_implementation = "eager"  # attention dropout as an F.dropout call (module docstring)
        self.hf = tf.GPT2LMHeadModel(config)
        self.hf.tie_weights()
        if self.hf.lm_head.weight is not self.hf.transformer.wte.weight:
            raise DropcheckError("GPT-2: the decoder is not tied to the token embedding")
        self.decoder: nn.Linear = self.hf.lm_head
        self.drop_head = nn.Dropout(q_head) if q_head > 0 else None  # group output (module docstring)
        self.positions = positions

    def init_state(self, batch_size: int):
        return ()

    def forward(self, tokens: torch.Tensor, state: Optional[Any] = None):
        if tokens.dim() != 2:
            raise DropcheckError(f"tokens must have shape (T, B), got {tuple(tokens.shape)}")
        if tokens.shape[0] > self.positions:
            raise DropcheckError(f"a segment of {tokens.shape[0]} tokens is longer than the model's "
                                 f"{self.positions} positions")
        feats = self.hf.transformer(input_ids=tokens.t(), use_cache=False).last_hidden_state  # (B, T, d)
        feats = feats.transpose(0, 1)
        if self.drop_head is not None:
            feats = self.drop_head(feats)
        return self.decoder(feats), ()


def max_segment(cfg: Mapping[str, Any]) -> int:
    """The longest segment the data can give: ``bptt``, or under
    ``variable_bptt`` the cap of ``data.sample_seq_len``."""
    from ..pipeline.data import max_seq_len

    return max_seq_len(cfg["bptt"]) if cfg["variable_bptt"] else int(cfg["bptt"])


def build(cfg: Mapping[str, Any], vocab: int) -> GPT2LM:
    """The GPT-2 of a run config (``ARCH.build``)."""
    return GPT2LM(vocab, cfg["emb"], cfg["layers"], cfg["heads"], max_segment(cfg),
                  q_embedding=cfg["q_embedding"], q_attention=cfg["q_attention"], q_residual=cfg["q_residual"],
                  q_head=cfg["q_head"])


def site_group(spec: SiteSpec, model: nn.Module) -> str:
    """The group of a site the core found: the embedding dropout module, the
    attention probabilities (a functional call made by a GPT-2 attention
    module), or a residual ``nn.Dropout``."""
    lm = model.lm if isinstance(model, StatefulLM) else model
    if not isinstance(lm, GPT2LM):
        raise DropcheckError(f"expected a GPT2LM (or a StatefulLM around one), got {type(lm).__name__}")
    tf = _transformers()
    attention = tf.models.gpt2.modeling_gpt2.GPT2Attention
    if spec.module is lm.hf.transformer.drop:
        return "embedding"
    if lm.drop_head is not None and spec.module is lm.drop_head:
        return "output"
    attns = [a for a in lm.hf.modules() if isinstance(a, attention)]
    if spec.functional and (isinstance(spec.module, attention) or any(spec.module is a.attn_dropout for a in attns)):
        return "attention"  # named after the calling module or after the module that holds its q
    if not spec.functional and isinstance(spec.module, nn.Dropout):
        # an attention module's own attn_dropout runs as a module only under reorder_and_upcast_attn
        if any(spec.module is a.attn_dropout for a in attns):
            return "attention"
        return "residual"
    raise DropcheckError(f"dropout site {spec.name!r} ({type(spec.module).__name__}) belongs to no group of GPT-2")


def check(cfg: Mapping[str, Any]) -> Optional[str]:
    """Configs GPT-2 cannot run (refused when the config is read)."""
    if not cfg["tie"]:
        return "its decoder is always tied to the token embedding (tie=false)"
    if cfg["noise_structure"] == "positions":
        return ("noise_structure=positions: every GPT-2 site is already per position "
                "(no locked sites), so the option would change nothing; leave it at 'locked'")
    return None


ARCH = Arch(
    name="gpt2",
    build=build,
    groups=GROUPS,
    site_group=site_group,
    keys=("heads", "q_attention", "q_residual", "q_head"),
    check=check,
    summary="Hugging Face GPT-2 (tied decoder; embedding, attention, residual and optional head dropout)",
)
