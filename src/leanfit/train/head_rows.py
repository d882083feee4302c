"""Run the final block only at the positions the head reads.

A BERT-style classifier reads one position of the final block's output (the [CLS] token, through
the pooler). Every other position of that block is computed and thrown away: its queries, attention
rows, output projection and feed-forward, forward and backward, about 80% of the block. When the
final block trains (top-1 or top-2 policies), that waste is a large part of a step.

`HeadRows.plan` keeps the first `n` positions of the final block when both hold on a sample batch:
- the logits' gradient with respect to the final block's output is zero beyond position n (the
  head does not read those positions);
- with the block cut to those positions, the logits equal the full model's (eval mode).
The cut block computes keys and values from every position and everything else (queries, attention,
output projection, feed-forward, residuals, dropout) from the first n only; the model then sees a
sequence of length n after the block, which a head reading those positions does not notice.

Blocks are recognised by their layout, not their class: the BERT layout (`attention.self.query/key/
value`, `attention.output`, `intermediate`, `output`) shared by BERT, RoBERTa, ELECTRA and their
copies. Other blocks run whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ForwardRewrite, transformer_blocks


def _bert_layout(block: nn.Module) -> bool:
    attention = getattr(block, "attention", None)
    inner = getattr(attention, "self", None)
    return (inner is not None and hasattr(attention, "output") and hasattr(block, "intermediate")
            and hasattr(block, "output") and not getattr(block, "is_decoder", False)
            and all(hasattr(inner, n) for n in ("query", "key", "value", "attention_head_size", "scaling", "dropout")))


def _bert_rows(block: nn.Module, n: int):
    """BertLayer.forward computing only positions [0, n) of its output."""
    inner = block.attention.self

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        batch, length, _ = hidden_states.shape
        kept = hidden_states[:, :n]

        def heads(t):
            return t.view(batch, t.shape[1], -1, inner.attention_head_size).transpose(1, 2)

        q, k, v = heads(inner.query(kept)), heads(inner.key(hidden_states)), heads(inner.value(hidden_states))
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-2] == length:
            mask = mask[:, :, :n]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=inner.scaling,
                                                 dropout_p=inner.dropout.p if inner.training else 0.0)
        attended = block.attention.output(context.transpose(1, 2).reshape(batch, n, -1), kept)
        return block.output(block.intermediate(attended), attended)

    return forward


def positions_read(model: nn.Module, block: nn.Module, sample: dict) -> int | None:
    """n when the logits depend on the first n positions of `block`'s output only (None otherwise)."""
    captured = {}

    def capture(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        leaf = hidden.detach().requires_grad_()
        captured["h"] = leaf
        return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

    handle = block.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            logits = getattr(model(**sample), "logits", None)
            if logits is None or "h" not in captured or not logits.requires_grad:
                return None
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)).to(logits)
            (grad,) = torch.autograd.grad((logits * weights).sum(), captured["h"], allow_unused=True)
    finally:
        handle.remove()
    if grad is None or grad.dim() != 3:
        return None
    read = grad.abs().amax(dim=(0, 2)).nonzero().flatten().tolist()
    n = read[-1] + 1 if read else 0
    return n if 0 < n < grad.shape[1] and read == list(range(n)) else None


class HeadRows(ForwardRewrite):
    """The final block cut to the positions the head reads, attached while the trainer runs."""

    def __init__(self, block: nn.Module, n: int):
        self.block, self.n = block, n

    @property
    def module(self) -> nn.Module:
        return self.block

    @staticmethod
    def plan(model: nn.Module, sample: dict) -> "HeadRows | None":
        found = transformer_blocks(model)
        if found is None or not _bert_layout(found[1][-1]):
            return None
        block = found[1][-1]
        was_training = model.training
        model.eval()
        try:
            n = positions_read(model, block, sample)
            if n is None:
                return None
            cut = HeadRows(block, n)
            with torch.no_grad():
                full = model(**sample).logits
                with cut.applied():
                    kept = model(**sample).logits
        finally:
            model.train(was_training)
        return cut if kept.shape == full.shape and torch.allclose(kept, full, rtol=1e-4, atol=1e-5) else None

    def forward(self):
        return _bert_rows(self.block, self.n)
