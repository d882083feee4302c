"""Decoding many requests at once, each row with its own adapter, on the model's KV cache.

Rows are sorted by adapter once, before the first step, and every step runs under one
`core.batching.mixed_batch`: the hosts build their stacked adapter factors once per generation, and
since the rows are already in the plan's order nothing (inputs, logits, cache) is ever reordered.
Prompts are left-padded; position ids follow the attention mask, so a padded row sees the positions
it would see alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.batching import RowPlan, mixed_batch


@dataclass
class GenerationParams:
    prompts: list[list[int]]  # token ids, one per choice
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1  # choices per prompt: `prompts` holds each prompt n times in a row


def generate(model: nn.Module, tokenizer, jobs: list) -> None:
    """Greedy or sampled decoding of every choice of every job (`job.payload` is GenerationParams;
    `job.adapter` its adapter) in one batch; results and text deltas go out through `job.emit`."""
    rows = [Row(job, c, ids, job.payload) for job in jobs for c, ids in enumerate(job.payload.prompts)]
    rows = [rows[i] for i in RowPlan.of([r.job.adapter for r in rows]).order.tolist()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows])
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    eos = getattr(model.config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    with mixed_batch(model, [r.job.adapter for r in rows]) as run:
        for _ in range(max(r.params.max_tokens for r in rows)):
            out = run({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                       "past_key_values": cache, "use_cache": True})
            cache, logits = out.past_key_values, out.logits[:, -1, :].float()
            next_ids = [r.next_token(logits[i]) if not r.finished else pad for i, r in enumerate(rows)]
            for r, token in zip(rows, next_ids):
                if not r.finished:
                    r.push(token, eos, tokenizer)
            if all(r.finished for r in rows):
                break
            ids = torch.tensor(next_ids).unsqueeze(1)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
    for job in jobs:
        mine = sorted((r for r in rows if r.job is job), key=lambda r: r.choice)
        job.emit("done", {"choices": [{"index": r.choice, "text": r.text,
                                       "finish_reason": r.finish_reason or "length"} for r in mine],
                          "prompt_tokens": sum(len(r.ids) for r in mine if r.choice % r.params.n == 0),  # once a prompt
                          "completion_tokens": sum(len(r.generated) for r in mine)})


class Row:
    """One choice being generated: its tokens, sampler, stop rules and the text already streamed."""

    def __init__(self, job, choice: int, ids: list[int], params: GenerationParams):
        self.job, self.choice, self.ids, self.params = job, choice, list(ids), params
        self.generated: list[int] = []
        self.text, self.sent, self.finish_reason = "", 0, None
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            # choice i draws from seed + i, kept in the generator's range (a seed near 2**64 would overflow)
            self.generator.manual_seed((params.seed + choice) % (1 << 64) if params.seed is not None else torch.seed())

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.job.cancelled

    def next_token(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        return sample(logits, self.params.temperature, self.params.top_p, self.generator)

    def push(self, token: int, eos: set, tokenizer) -> None:
        if token in eos:
            self.finish_reason = "stop"
        else:
            self.generated.append(token)
            self.text = tokenizer.decode(self.generated, skip_special_tokens=True)
            hits = [self.text.find(s) for s in self.params.stop if s and s in self.text]
            if hits:
                self.text, self.finish_reason = self.text[:min(hits)], "stop"
            elif len(self.generated) >= self.params.max_tokens:
                self.finish_reason = "length"
        self._stream()

    def _stream(self) -> None:
        """Send the text that can no longer change: hold back a possible stop-sequence prefix and a
        half-decoded character."""
        end = len(self.text)
        if self.finish_reason is None:
            hold = max((len(s) - 1 for s in self.params.stop), default=0)
            end = max(self.sent, end - hold)
            if self.text[self.sent:end].endswith("\ufffd"):
                end = self.text.rfind("\ufffd", self.sent, end)
        if end > self.sent:
            self.job.emit("delta", (self.choice, self.text[self.sent:end]))
            self.sent = end


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p, renormalised."""
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
