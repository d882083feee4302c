"""One layer of a mixed batch: each row its own adapter, in a few tensor ops whatever their number.

A host builds a `HostRows` once per row plan (core/batching.py) from its adapters' batched forms
(methods/base.py), then applies it to every forward that runs under that plan (all steps of a
generation):

- LowRank adapters (the LoRA family) are stacked per segment, ranks padded with zeros (exact), and
  applied with two `bmm` (S-LoRA / Punica's batched gather: one op per layer whatever the number of
  adapters). The stack comes from the host's `LowRankBank` (every resident adapter stacked once,
  rebuilt when adapters change) with one index_select per factor. A batch of one adapter uses plain
  2-D matmuls on the adapter's own tensors or, when the batch has many tokens, one GEMM with
  W + s B A formed for that forward in a scratch tensor (the shared base weight is never written).
- ChannelAffine adapters (IA3, SSF, BitFit) become per-row scale and shift vectors.
- Anything else (methods with no batched form, adapters in training mode) adds `delta` per segment.

On a plain nn.Linear the low-rank part is computed first, with the bias, into the output buffer, and
the base GEMM then accumulates onto it (beta=1). Adding the delta afterwards would cost one more pass
over the output, which on a CPU is most of LoRA's overhead (the extra FLOPs are ~3%).
Everything here runs without autograd (inference); hosts take the per-segment path when grad is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.base import CONV2D, LINEAR, ChannelAffine, LowRank, layer_kind, out_features


def fusable(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the host may compute this plain Linear itself (so the base GEMM accumulates)."""
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and x.dtype == base.weight.dtype and x.dim() >= 2)


def _pad(factor: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """`factor` with zeros appended along `axis` up to `rank` (F.pad copies even when nothing is added)."""
    missing = rank - factor.shape[axis]
    if missing == 0:
        return factor
    return F.pad(factor, (0, 0, 0, missing) if axis == 0 else (0, missing))


def _fill(out: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Start rows without a low-rank delta from the bias (or zero), as F.linear's own GEMM does."""
    if out.numel() == 0:
        return
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.expand_as(out))


def stack_factors(forms: list[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (k, r, in), up_t (k, r, out) with the scale folded in); smaller ranks padded with zeros,
    which add exact zeros. up_t is contiguous in that layout: bmm is several times faster on it."""
    rank = max(f.down.shape[0] for f in forms)
    like = {"device": forms[0].down.device, "dtype": forms[0].down.dtype}
    down = torch.stack([_pad(f.down, rank, 0) for f in forms])
    scales = torch.tensor([f.scale for f in forms], **like).view(-1, 1, 1)
    up = torch.stack([_pad(f.up, rank, 1) for f in forms]).mul_(scales)  # (k, out, r)
    return down, up.transpose(1, 2).contiguous()


def _key(form: LowRank) -> tuple | None:
    """Identifies a form's values while its tensors are views of the adapter's own parameters: where
    they are, their shape, and their version counter (bumped by every in-place change). None for
    tensors computed under inference mode, which have no version counter (and are never banked)."""
    if form.down.is_inference() or form.up.is_inference():
        return None
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t._version) for t in (form.down, form.up)) + (form.scale,)


def bankable(module: nn.Module, form: LowRank) -> bool:
    """Whether the form's tensors are views of the module's parameters or buffers (not computed anew
    on each call, like LoRA-SB's R A), so a stacked copy can be checked for staleness by _key."""
    owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    return all(t.untyped_storage().data_ptr() in owned for t in (form.down, form.up))


class LowRankBank:
    """Every resident bankable LowRank adapter of one host, stacked once, in name order (a plan's
    order), so that a plan gathers its adapters with one index_select per factor instead of stacking
    them from scattered parameters; a plan that uses every banked adapter uses the bank as it is.
    It holds a second copy of those factors. Hosts drop it when adapters are added or removed."""

    def __init__(self, forms: dict[str, LowRank]):
        names = sorted(forms)
        self.index = {n: i for i, n in enumerate(names)}
        self.keys = {n: _key(forms[n]) for n in names}
        self.ranks = {n: forms[n].down.shape[0] for n in names}
        self.down, self.up_t = stack_factors([forms[n] for n in names])

    def fresh(self, forms: dict[str, LowRank]) -> bool:
        return all(n in self.keys and self.keys[n] == _key(f) for n, f in forms.items())

    def take(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked factors of `names`, cut to their largest rank (the padding is trailing zeros)."""
        rank = max(self.ranks[n] for n in names)
        idx = [self.index[n] for n in names]
        if idx == list(range(len(self.index))) and rank == self.down.shape[1]:
            return self.down, self.up_t
        idx = torch.tensor(idx, device=self.down.device)
        return self.down[:, :rank].index_select(0, idx), self.up_t[:, :rank].index_select(0, idx)


class LowRankRows:
    """The LowRank adapters of one host for one plan: segments (form, start, end), sorted by start.

    Modes: "single" (one adapter on every row: 2-D matmuls), "equal" (contiguous segments of equal
    length: the batch is viewed as (segments, rows * tokens, in), no copy), "gather" (anything else:
    the segments' rows are gathered, padded to the longest, and the deltas scattered back)."""

    def __init__(self, parts: list[tuple[str, LowRank, int, int]], n_rows: int, bank: "LowRankBank | None"):
        self.n_rows = n_rows
        first = parts[0][1]
        self.lo, self.hi = parts[0][2], parts[-1][3]
        if len(parts) == 1 and self.lo == 0 and self.hi == n_rows:
            self.mode = "single"
            self.down, self.up = first.down, first.up * first.scale  # scale folded in once per plan
            return
        lengths = [e - s for _, _, s, e in parts]
        contiguous = all(parts[i][3] == parts[i + 1][2] for i in range(len(parts) - 1))
        self.mode = "equal" if contiguous and len(set(lengths)) == 1 else "gather"
        self.k, self.width = len(parts), max(lengths)
        device = first.down.device
        if bank is not None:
            self.down, self.up_t = bank.take([name for name, _, _, _ in parts])
        else:
            self.down, self.up_t = stack_factors([f for _, f, _, _ in parts])
        if self.mode == "gather":
            # Segment j's rows, padded (with its first row, whose extra results are dropped) to `width`.
            pad = [list(range(s, e)) + [s] * (self.width - (e - s)) for _, _, s, e in parts]
            self.padded = torch.tensor(pad, device=device).view(-1)
            self.valid = torch.tensor([j * self.width + i for j, (_, _, s, e) in enumerate(parts) for i in range(e - s)],
                                      device=device)
            self.rows = torch.cat([torch.arange(s, e) for _, _, s, e in parts]).to(device)

    def merges_cheaper(self, x: torch.Tensor, base: nn.Linear) -> bool:
        """One adapter on every row: whether forming W + s B A for this forward (one pass reading W,
        one writing the scratch weight) moves less memory than the low-rank path (one more pass over
        the input, one over the output). True for encoder batches and prompts, not for a few decode
        tokens; the extra FLOPs (out x in x r) are small either way."""
        tokens = x.numel() // x.shape[-1]
        n_in, n_out = base.in_features, base.out_features
        return self.mode == "single" and tokens * (n_in + n_out) >= 2 * n_in * n_out

    def merged_weight(self, base: nn.Linear) -> torch.Tensor:
        """W + s B A as a new tensor (the scale is folded into `up`)."""
        return torch.addmm(base.weight, self.up, self.down)

    def _segments(self, x3: torch.Tensor) -> torch.Tensor:
        """The rows of each segment as (k, width * tokens, in)."""
        tokens, n_in = x3.shape[1], x3.shape[2]
        if self.mode == "equal":
            return x3[self.lo:self.hi].reshape(self.k, self.width * tokens, n_in)
        return x3[self.padded].view(self.k, self.width * tokens, n_in)

    def _hidden(self, xs: torch.Tensor) -> torch.Tensor:
        """A x per segment, (k, tokens, r); computed as A x^T, the faster layout for a small r."""
        return torch.bmm(self.down, xs.transpose(1, 2)).transpose(1, 2)

    def prefill(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        """bias + delta for every row, as the (rows * tokens, out) buffer the base GEMM adds onto."""
        n_out, bias = base.out_features, base.bias
        if self.mode == "single":
            h = F.linear(x.reshape(-1, x.shape[-1]), self.down)
            return torch.addmm(bias, h, self.up.T) if bias is not None else h @ self.up.T
        x3 = x.reshape(self.n_rows, -1, x.shape[-1])
        out = torch.empty(self.n_rows, x3.shape[1], n_out, device=x.device, dtype=x.dtype)
        if self.mode == "equal":
            for rest in (out[:self.lo], out[self.hi:]):
                _fill(rest, bias)
            target = out[self.lo:self.hi].view(self.k, -1, n_out)
            h = self._hidden(self._segments(x3))
            if bias is None:
                torch.bmm(h, self.up_t, out=target)
            else:
                torch.baddbmm(bias, h, self.up_t, out=target)
        else:
            _fill(out, bias)
            self._scatter_add(out, torch.bmm(self._hidden(self._segments(x3)), self.up_t))
        return out.view(-1, n_out)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out += delta, in place, for a base output computed by the base layer itself."""
        n_out = out.shape[-1]
        if self.mode == "single":
            h = F.linear(x.reshape(-1, x.shape[-1]), self.down)
            out.view(-1, n_out).addmm_(h, self.up.T)
            return
        x3 = x.reshape(self.n_rows, -1, x.shape[-1])
        out3 = out.view(self.n_rows, -1, n_out)
        deltas = torch.bmm(self._hidden(self._segments(x3)), self.up_t)
        if self.mode == "equal":
            out3[self.lo:self.hi].view(self.k, -1, n_out).add_(deltas)
        else:
            self._scatter_add(out3, deltas)

    def _scatter_add(self, out3: torch.Tensor, deltas: torch.Tensor) -> None:
        tokens, n_out = out3.shape[1], out3.shape[2]
        out3.index_add_(0, self.rows, deltas.view(self.k * self.width, tokens, n_out)[self.valid])


class AffineRows:
    """Per-row scale and shift vectors (zero outside the ChannelAffine adapters' rows) over a row span."""

    def __init__(self, parts: list[tuple[ChannelAffine, int, int]], base: nn.Module):
        self.lo, self.hi = parts[0][1], parts[-1][2]
        channels, self.conv = out_features(base), layer_kind(base) == CONV2D
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.scale = self.shift = None
        if any(f.scale is not None for f, _, _ in parts):
            self.scale = torch.zeros(self.hi - self.lo, channels, **like)
        if any(f.shift is not None for f, _, _ in parts):
            self.shift = torch.zeros(self.hi - self.lo, channels, **like)
        for form, s, e in parts:
            if form.scale is not None:
                self.scale[s - self.lo:e - self.lo] = form.scale
            if form.shift is not None:
                self.shift[s - self.lo:e - self.lo] = form.shift

    def _shaped(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ones = [1] * (out.dim() - 2)
        return v.view(v.shape[0], -1, *ones) if self.conv else v.view(v.shape[0], *ones, -1)

    def apply(self, out: torch.Tensor) -> None:
        """out = out + out * scale + shift on the span's rows, in place (base_out * (l - 1) as IA3 adds)."""
        span = out[self.lo:self.hi]
        if self.scale is not None:
            span.addcmul_(span, self._shaped(self.scale, out))
        if self.shift is not None:
            span.add_(self._shaped(self.shift, out))


class HostRows:
    """Everything one host adds to a mixed batch under one row plan."""

    def __init__(self, adapters: nn.ModuleDict, segments, n_rows: int, base: nn.Module,
                 bank: LowRankBank | None = None):
        low, affine, self.other = [], [], []
        for name, s, e in segments:
            module = adapters[name]
            form = None if module.training else module.batched_form(base)
            if isinstance(form, LowRank) and layer_kind(base) == LINEAR:
                low.append((name, form, s, e))
            elif isinstance(form, ChannelAffine):
                affine.append((form, s, e))
            else:
                self.other.append((module, s, e))
        self.bank, self.low = bank, None
        if len(low) > 1:
            needed = {n: f for n, f, _, _ in low}
            self.bank = _refreshed(bank, adapters, base, needed)
            usable = self.bank is not None and self.bank.fresh(needed)
            self.low = LowRankRows(low, n_rows, self.bank if usable else None)
        elif low:
            self.low = LowRankRows(low, n_rows, None)
        self.affine = AffineRows(affine, base) if affine else None

    @property
    def empty(self) -> bool:
        return self.low is None and self.affine is None and not self.other

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.low is not None and fusable(base, x):
            if self.low.merges_cheaper(x, base):
                out = F.linear(x, self.low.merged_weight(base), base.bias)
            else:
                out = self.low.prefill(x, base)
                out.addmm_(x.reshape(-1, x.shape[-1]), base.weight.T)
                out = out.view(*x.shape[:-1], base.out_features)
        else:
            out = base(x)
            if self.low is not None:
                self.low.add_to(out, x)
        if self.affine is not None:
            self.affine.apply(out)
        for module, s, e in self.other:  # rows s:e still hold the base output here
            out[s:e] += module.delta(x[s:e], out[s:e], base)
        return out


def _refreshed(bank: LowRankBank | None, adapters: nn.ModuleDict, base: nn.Module,
               needed: dict[str, LowRank]) -> LowRankBank | None:
    """`bank` if it holds `needed` as they are now, else a new bank of every bankable adapter of the
    host (None when a needed adapter cannot be banked: the plan then stacks its own factors)."""
    if bank is not None and bank.fresh(needed):
        return bank
    if not all(bankable(adapters[n], f) for n, f in needed.items()):
        return bank
    forms = {}
    for name, module in adapters.items():
        form = None if module.training else module.batched_form(base)
        if isinstance(form, LowRank) and bankable(module, form):
            forms[name] = form
    return LowRankBank(forms)

