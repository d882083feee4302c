"""A causal LM's loss without its logits tensor: the output projection and cross-entropy fused,
chunk by chunk over the tokens.

SmolLM2's vocabulary has 49,152 tokens. A batch of 8 x 128 tokens makes a 200 MB logits tensor, and
the usual path (`lm_head`, then `cross_entropy`) writes it, its log-softmax, a zero-filled gradient
and the log-softmax gradient, each freshly allocated; an evaluation batch of 64 rows makes 1.6 GB of
logits. Here each chunk's logits are computed, turned into the loss and the gradient with respect to
the hidden states at once (softmax minus one-hot, times the weight), and dropped; the backward pass
only scales that stored gradient. The same matrix products run; the big tensors never exist, which
saves memory (SmolLM2, LoRA on every block: 0.58 GB of a 4.06 GB training peak) and passes over
them: on 2 cores, 0.50 s for SmolLM2's output layer and loss on 8 x 128 tokens, forward and backward,
against 0.61-0.64 s through the logits. (The idea of Liger-Kernel's fused linear cross-entropy and
Apple's Cut Cross-Entropy.)

`FusedLMLoss.plan` uses it for a Hugging Face causal LM whose output layer is a frozen `nn.Linear`,
when on a sample batch its loss equals the model's own. While the trainer runs, a forward with labels
(training steps, and evaluation, which needs only the loss for perplexity) returns the loss and no
logits; a forward without labels runs the model whole.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ForwardRewrite
from .metrics import IGNORE_INDEX

# Logits per chunk. Every chunk reads the whole output weight (113 MB for SmolLM2) twice, so small
# chunks are bound by memory: on a 2-core CPU a batch of 8 x 128 SmolLM2 tokens took 0.71 s in 8 MB
# chunks (42 tokens), 0.52 s in 32 MB chunks and 0.59 s in 64 MB chunks (forward and backward).
CHUNK_BYTES = 32 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over labelled tokens of cross_entropy(hidden @ weight.T + bias, targets), gradient with
    respect to `hidden` only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        labelled = targets != IGNORE_INDEX
        count = labelled.sum().clamp(min=1)
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # half-precision logits upcast, as HF does
        total = hidden.new_zeros((), dtype=dtype)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None  # evaluation: the loss alone
        for start in range(0, hidden.shape[0], chunk):
            h, t, keep = hidden[start:start + chunk], targets[start:start + chunk], labelled[start:start + chunk]
            logits = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).to(dtype)
            index = t.clamp(min=0)  # ignored rows pick token 0 and are weighted 0
            picked = logits.gather(1, index.unsqueeze(1)).squeeze(1)
            # log-sum-exp by hand, keeping exp(logits - max) in place: it is the softmax's numerator,
            # so the gradient needs no second exp pass over the chunk
            top = logits.amax(dim=1, keepdim=True)
            numerators = logits.sub_(top).exp_()
            sums = numerators.sum(dim=1)
            total += ((sums.log() + top.squeeze(1) - picked) * keep).sum()
            if grad is None:
                continue
            # d loss / d logits = (softmax - one_hot) / count on labelled rows
            share = keep.to(dtype) / count
            probs = numerators.mul_((share / sums).unsqueeze(1))
            probs[torch.arange(len(t)), index] -= share
            grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T + bias` against `targets` (IGNORE_INDEX skipped),
    with `hidden` (tokens x d) and `targets` (tokens,), never holding all the logits at once."""
    chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    device = weight.device.type
    if torch.is_autocast_enabled(device):  # cast the weight once, not in every chunk's two products
        low = torch.get_autocast_dtype(device)
        weight, bias = weight.to(low), None if bias is None else bias.to(low)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)


def _fused_forward(decoder: nn.Module, head: nn.Linear, original):
    """The model's forward computing the loss from the decoder's hidden states directly."""

    def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        if labels is None:  # logits wanted
            return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        # predict token t+1 from tokens <= t, as Hugging Face's causal-LM loss does
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        loss = linear_cross_entropy(h, head.weight, head.bias, labels[:, 1:].reshape(-1))
        return _Output(loss)

    return forward


class _Output(dict):
    """What the trainer reads from a forward with labels: `.loss`; no logits were made."""

    def __init__(self, loss):
        super().__init__(loss=loss)
        self.loss, self.logits = loss, None


class FusedLMLoss(ForwardRewrite):
    """The fused output projection and loss, attached to a causal LM while the trainer runs."""

    def __init__(self, model: nn.Module, decoder: nn.Module, head: nn.Linear):
        self.model, self.decoder, self.head = model, decoder, head

    @property
    def module(self) -> nn.Module:
        return self.model

    @staticmethod
    def plan(model: nn.Module, sample: dict) -> "FusedLMLoss | None":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if (type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters())
                or not isinstance(decoder, nn.Module) or decoder is model):
            return None
        fused = FusedLMLoss(model, decoder, head)
        labelled = {**sample, "labels": sample["input_ids"]}
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                expected = model(**labelled).loss.detach()  # its graph (full logits) freed at once
                with fused.applied():
                    got = model(**labelled).loss.detach()
        except (TypeError, ValueError, IndexError):  # a forward this wrapper does not fit
            return None
        finally:
            model.train(was_training)
        return fused if torch.allclose(got, expected, rtol=1e-5, atol=1e-6) else None

    def forward(self):
        return _fused_forward(self.decoder, self.head, type(self.model).forward.__get__(self.model))
