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


def stack_factors(forms: list[LowRank], bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (k, r, in), up_t (k, lead + r, out) with the scale folded in); smaller ranks padded with
    zeros, which add exact zeros. up_t is contiguous in that layout: bmm is several times faster on it.
    With a bias, row 0 of each up_t is the bias (lead = 1): the up-projection, given a column of ones,
    then writes bias + delta in one pass over the output, instead of a pass copying the bias first."""
    rank = max(f.down.shape[0] for f in forms)
    like = {"device": forms[0].down.device, "dtype": forms[0].down.dtype}
    down = torch.stack([_pad(f.down, rank, 0) for f in forms])
    scales = torch.tensor([f.scale for f in forms], **like).view(-1, 1, 1)
    up = torch.stack([_pad(f.up, rank, 1) for f in forms]).mul_(scales).transpose(1, 2)  # (k, r, out)
    if bias is not None:
        up = torch.cat([bias.to(up.dtype).expand(len(forms), 1, -1), up], dim=1)
    return down, up.contiguous()


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    """Where a tensor is, its shape, and its version counter (bumped by every in-place change)."""
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t._version)


def _key(form: LowRank) -> tuple | None:
    """Identifies a form's values while its tensors are views of the adapter's own parameters. None
    for tensors computed under inference mode, which have no version counter (and are never banked)."""
    if form.down.is_inference() or form.up.is_inference():
        return None
    return _tensor_key(form.down), _tensor_key(form.up), form.scale


def bankable(module: nn.Module, form: LowRank) -> bool:
    """Whether the form's tensors are views of the module's parameters or buffers (not computed anew
    on each call, like LoRA-SB's R A), so a stacked copy can be checked for staleness by _key."""
    owned = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    return all(t.untyped_storage().data_ptr() in owned for t in (form.down, form.up))


def banked_bytes(module: nn.Module, base: nn.Module) -> int:
    """Bytes the layer's LowRankBank holds for this adapter once a mixed batch has built it: a copy
    of its low-rank factors, and a row for the base layer's bias; 0 for an adapter it does not bank."""
    form = None if module.training else module.batched_form(base)
    if layer_kind(base) != LINEAR or not isinstance(form, LowRank) or not bankable(module, form):
        return 0
    rank, n_in = form.down.shape
    values = rank * (n_in + form.up.shape[0]) + (out_features(base) if _bias(base) is not None else 0)
    return values * form.down.element_size()


class LowRankBank:
    """Every resident bankable LowRank adapter of one host, stacked once, in name order (a plan's
    order), so that a plan gathers its adapters with one index_select per factor instead of stacking
    them from scattered parameters; a plan that uses every banked adapter uses the bank as it is.
    It holds a second copy of those factors (and of the base layer's bias, see stack_factors).
    Hosts drop it when adapters are added or removed."""

    def __init__(self, forms: dict[str, LowRank], bias: torch.Tensor | None,
                 modules: dict[str, nn.Module] | None = None):
        names = sorted(forms)
        self.index = {n: i for i, n in enumerate(names)}
        self.forms = forms
        self.keys = {n: _key(forms[n]) for n in names}
        # (module, its form_stamp) when the form was taken: while both hold, the form is current
        self.stamps = {n: (m, m.form_stamp()) for n, m in (modules or {}).items()}
        self.ranks = {n: forms[n].down.shape[0] for n in names}
        self.bias_key = _tensor_key(bias)
        self.down, self.up_t = stack_factors([forms[n] for n in names], bias)

    def current_form(self, name: str, module: nn.Module) -> LowRank | None:
        """The banked form of `name` if `module` is the banked one and unchanged since, else None."""
        banked = self.stamps.get(name)
        if banked is None or banked[0] is not module or banked[1] is None:
            return None
        return self.forms[name] if module.form_stamp() == banked[1] else None

    def fresh(self, forms: dict[str, LowRank], bias: torch.Tensor | None) -> bool:
        return self.bias_key == _tensor_key(bias) and all(
            n in self.keys and self.keys[n] == _key(f) for n, f in forms.items())

    def take(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked factors of `names`, cut to their largest rank (the padding is trailing zeros)."""
        rank = max(self.ranks[n] for n in names)
        lead = 0 if self.bias_key is None else 1
        idx = [self.index[n] for n in names]
        if idx == list(range(len(self.index))) and rank == self.down.shape[1]:
            return self.down, self.up_t
        idx = torch.tensor(idx, device=self.down.device)
        return self.down[:, :rank].index_select(0, idx), self.up_t[:, :lead + rank].index_select(0, idx)


class LowRankRows:
    """The LowRank adapters of one host for one plan: segments (form, start, end), sorted by start.

    Modes: "single" (one adapter on every row: 2-D matmuls), "equal" (contiguous segments of equal
    length: the batch is viewed as (segments, rows * tokens, in), no copy), "gather" (anything else:
    the segments' rows are gathered, padded to the longest, and the deltas scattered back)."""

    def __init__(self, parts: list[tuple[str, LowRank, int, int]], n_rows: int, bank: "LowRankBank | None",
                 bias: torch.Tensor | None = None):
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
            self.down, up = bank.take([name for name, _, _, _ in parts])
        else:
            self.down, up = stack_factors([f for _, f, _, _ in parts], bias)
        # up_t: the factors alone; up_tb: with the bias as row 0 (None without a bias)
        self.up_tb, self.up_t = (up, up[:, 1:]) if bias is not None else (None, up)
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

    def _hidden(self, xs: torch.Tensor, ones: bool = False) -> torch.Tensor:
        """A x per segment, (k, tokens, r), computed as A x^T, the faster layout for a small r; with
        `ones`, a column of ones first, (k, tokens, 1 + r), to take up_tb's bias row."""
        h = torch.bmm(self.down, xs.transpose(1, 2))
        if ones:
            h = torch.cat([h.new_ones(1, 1, 1).expand(h.shape[0], 1, h.shape[2]), h], dim=1)
        return h.transpose(1, 2)

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
            h = self._hidden(self._segments(x3), ones=bias is not None)
            torch.bmm(h, self.up_t if bias is None else self.up_tb, out=target)
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
        linear = layer_kind(base) == LINEAR
        modules = adapters._modules  # a plain dict: this loop runs once per adapter and layer of a plan
        banked = 0  # low-rank forms taken from the bank unchanged (their keys need no check)
        for name, s, e in segments:
            module = modules[name]
            form = bank.current_form(name, module) if bank is not None and linear else None
            if form is not None:
                banked += 1
            elif not module.training:
                form = module.batched_form(base)
            if linear and isinstance(form, LowRank):
                low.append((name, form, s, e))
            elif isinstance(form, ChannelAffine):
                affine.append((form, s, e))
            else:
                self.other.append((module, s, e))
        self.bank, self.low, bias = bank, None, _bias(base)
        if len(low) > 1:
            needed = {n: f for n, f, _, _ in low}
            if banked == len(low) and bank.bias_key == _tensor_key(bias):
                usable = True
            else:
                self.bank, usable = _refreshed(bank, adapters, base, needed, bias)
            self.low = LowRankRows(low, n_rows, self.bank if usable else None, bias)
        elif low:
            self.low = LowRankRows(low, n_rows, None, bias)
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
               needed: dict[str, LowRank], bias: torch.Tensor | None) -> tuple[LowRankBank | None, bool]:
    """(bank, whether it holds `needed` as they are now): `bank` if it does, else a new bank of every
    bankable adapter of the host; `bank` unchanged and False when a needed adapter cannot be banked
    (the plan then stacks its own factors)."""
    if bank is not None and bank.fresh(needed, bias):
        return bank, True
    if not all(bankable(adapters[n], f) for n, f in needed.items()):
        return bank, False
    forms, modules = {}, {}
    for name, module in adapters.items():
        form = None if module.training else module.batched_form(base)
        if isinstance(form, LowRank) and bankable(module, form):
            forms[name], modules[name] = form, module
    fresh = LowRankBank(forms, bias, modules)
    return fresh, fresh.fresh(needed, bias)


def _bias(base: nn.Module) -> torch.Tensor | None:
    bias = getattr(base, "bias", None)
    return bias if torch.is_tensor(bias) else None

