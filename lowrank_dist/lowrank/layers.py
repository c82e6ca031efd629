"""LowRankConv2d: a kh×kw convolution factorized into a vertical kh×1 conv (C→K) followed by a
horizontal 1×kw conv (K→N), as in Tai et al. (ICLR 2016).

The vertical conv takes the height part of the stride, padding and dilation; the horizontal conv
takes the width part and the bias. With no nonlinearity between them the pair is one linear map
whose kernel is Ŵ[n,c,i,j] = Σ_k V[k,c,i]·H[n,k,j] (`dense_weight`), so a forward pass equals the
dense conv with Ŵ, and `reproject` can re-impose rank K exactly. An optional BatchNorm between the
two convs (off by default; the authors put BN after the horizontal conv) breaks that equivalence.

The same function runs in one of two forms (`execution`), with the same parameters V and H:
- "factorized": the two thin convs, K·(C·kh + N·kw) MACs per output pixel, but the K-channel
  intermediate is written to memory and read back;
- "composed": Ŵ is built from V and H at every call (N·C·kh·kw·K MACs, whatever the batch and
  image size) and applied as one dense conv. Autograd carries the gradient through the composition,
  so only V and H (and the bias) receive gradients and the rank-K constraint holds exactly.
Which is faster depends on the layer, the device, dtype and batch (report/execution.py times both).
The form is not part of the state dict: a checkpoint loads, trains and evaluates under either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .svd import Decomposition, check_rank, decompose_kernel, decompose_linear, recompose


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _resolve_padding(padding, kernel_size, stride, dilation) -> tuple[int, int]:
    """Integer (ph, pw) for an nn.Conv2d padding argument; 'same' only where it is symmetric."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(
                f"padding='same' with kernel {kernel_size} and dilation {dilation} pads asymmetrically,"
                " which a vertical/horizontal split cannot express; give integer padding"
            )
        return (total[0] // 2, total[1] // 2)
    return _pair(padding)


class LowRankConv2d(nn.Module):
    """vertical: Conv2d(C → groups·K, (kh,1), stride (sh,1), padding (ph,0), dilation (dh,1), no bias)
    [between: BatchNorm2d(groups·K), only if bn_between]
    horizontal: Conv2d(groups·K → N, (1,kw), stride (1,sw), padding (0,pw), dilation (1,dw), bias)

    `rank` is the number of vertical filters, the total over the groups as in the authors'
    prototxts (CaffeNet's conv2 "40" is 20 per group); a grouped conv keeps its groups in both
    factors, so each group has rank/groups of them.
    `execution` says which form the forward runs (module docstring); "factorized" unless set.
    """

    EXECUTIONS = ("factorized", "composed")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        bn_between: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kh, kw = _pair(kernel_size)
        sh, sw = _pair(stride)
        dh, dw = _pair(dilation)
        ph, pw = _resolve_padding(padding, (kh, kw), (sh, sw), (dh, dw))
        if kh * kw == 1:
            raise ValueError("a 1×1 convolution cannot be factorized into vertical and horizontal parts")
        check_rank(rank, in_channels, out_channels, (kh, kw), groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (kh, kw), (sh, sw), (ph, pw), (dh, dw)
        self.groups, self.rank = groups, rank
        factory = {"device": device, "dtype": dtype}
        self.vertical = nn.Conv2d(
            in_channels, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
            groups=groups, bias=False, **factory,
        )
        self.between = nn.BatchNorm2d(rank, **factory) if bn_between else None
        self.horizontal = nn.Conv2d(
            rank, out_channels, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
            groups=groups, bias=bias, **factory,
        )
        self._execution = "factorized"

    @property
    def execution(self) -> str:
        return self._execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in self.EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(self.EXECUTIONS)}, got {value!r}")
        if value == "composed" and self.between is not None:
            raise ValueError(
                "execution 'composed' is impossible with BatchNorm between the vertical and horizontal convs:"
                " in training BN normalises the intermediate by its batch statistics, so the pair is not one kernel"
            )
        self._execution = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._composed(x) if self._execution == "composed" else self._factorized(x)

    def _factorized(self, x: torch.Tensor) -> torch.Tensor:
        x = self.vertical(x)
        if self.between is not None:
            x = self.between(x)
        return self.horizontal(x)

    def _composed(self, x: torch.Tensor) -> torch.Tensor:
        """conv2d(x, Ŵ) + b with Ŵ = Σ_k V_k ⊗ H_k: vertical's height stride/padding/dilation and
        horizontal's width ones make exactly the dense conv's (sh, sw), (ph, pw), (dh, dw)."""
        return F.conv2d(x, self.dense_weight(), self.horizontal.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    # -- construction from a dense conv ----------------------------------------------------------

    @classmethod
    def _like(cls, conv: nn.Conv2d, rank: int, bn_between: bool) -> "LowRankConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={conv.padding_mode!r} cannot be split into a vertical and a horizontal"
                " pass (the corners differ); only 'zeros' is supported"
            )
        return cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            bn_between=bn_between, device=conv.weight.device, dtype=conv.weight.dtype,
        )

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int, bn_between: bool = False, decomposition: Decomposition | None = None
    ) -> "LowRankConv2d":
        """The exact rank-K decomposition of a (trained) dense conv: the fine-tune path.
        `decomposition`, if given, is `decompose_kernel(conv.weight, rank // conv.groups, conv.groups)`
        computed by the caller (who wants its error)."""
        layer = cls._like(conv, rank, bn_between)
        layer.load_decomposition(decomposition or decompose_kernel(conv.weight, rank // conv.groups, conv.groups))
        if conv.bias is not None:
            with torch.no_grad():
                layer.horizontal.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_scratch_like(cls, conv: nn.Conv2d, rank: int, bn_between: bool = False) -> "LowRankConv2d":
        """A freshly initialised factorized twin of `conv`, for training from scratch.

        The factors are drawn so that the composed map has the same gain as the dense layer's own
        initialisation (whatever scheme the model used): V ~ N(0, 1/(C·kh)) preserves the input's
        variance, and H ~ N(0, σ_W²·C·kh·kw / (K·kw)) then reproduces the dense output variance
        C·kh·kw·σ_W²·E[x²], where σ_W is the standard deviation of conv.weight as initialised
        (C and K per group).
        """
        layer = cls._like(conv, rank, bn_between)
        c = conv.in_channels // conv.groups
        kh, kw = conv.kernel_size
        sigma_w = float(conv.weight.detach().float().std()) if conv.weight.numel() > 1 else 0.0
        if not math.isfinite(sigma_w) or sigma_w == 0.0:
            sigma_w = 1.0 / math.sqrt(c * kh * kw)
        with torch.no_grad():
            layer.vertical.weight.normal_(0.0, 1.0 / math.sqrt(c * kh))
            layer.horizontal.weight.normal_(0.0, sigma_w * math.sqrt(c * kh * kw / (rank // conv.groups * kw)))
            if conv.bias is not None:
                layer.horizontal.bias.copy_(conv.bias)
        return layer

    # -- the composed kernel and re-projection ----------------------------------------------------

    def load_decomposition(self, decomposition: Decomposition) -> None:
        """Copy factors into this layer, resizing it if the rank changed."""
        if decomposition.groups != self.groups:
            raise ValueError(f"decomposition has {decomposition.groups} groups, layer has {self.groups}")
        if decomposition.rank * self.groups != self.rank:
            # New parameters: an optimizer holding the old ones must be rebuilt by the caller.
            self.rank = decomposition.rank * self.groups
            self.vertical.out_channels = self.horizontal.in_channels = self.rank
            self.vertical.weight = nn.Parameter(torch.empty_like(decomposition.vertical))
            self.horizontal.weight = nn.Parameter(torch.empty_like(decomposition.horizontal))
            if self.between is not None:
                self.between = nn.BatchNorm2d(self.rank).to(decomposition.vertical.device)
        with torch.no_grad():
            self.vertical.weight.copy_(decomposition.vertical)
            self.horizontal.weight.copy_(decomposition.horizontal)

    def dense_weight(self) -> torch.Tensor:
        """Ŵ[n,c,i,j] = Σ_k V[k,c,i]·H[n,k,j]: the N×(C/groups)×kh×kw kernel this layer applies."""
        if self.between is not None:
            raise ValueError(
                "dense_weight() is undefined with BatchNorm between the vertical and horizontal convs:"
                " the pair is no longer one linear kernel"
            )
        return recompose(self.vertical.weight, self.horizontal.weight, self.groups)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense nn.Conv2d (same outputs up to rounding)."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.horizontal.bias is not None,
            device=self.vertical.weight.device, dtype=self.vertical.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if conv.bias is not None:
                conv.bias.copy_(self.horizontal.bias)
        return conv

    @torch.no_grad()
    def reproject(self, rank: int | None = None) -> Decomposition:
        """Replace the factors by the exact rank-`rank` decomposition (default: the current rank; a
        total over the groups, like the constructor's) of the current composed kernel. At the same rank this re-balances V and H (‖V_k‖ = ‖H_k‖ = √s_k)
        without changing the layer's output, in place, so an optimizer's references stay valid."""
        rank = self.rank if rank is None else rank
        check_rank(rank, self.in_channels, self.out_channels, self.kernel_size, self.groups)
        decomposition = decompose_kernel(self.dense_weight(), rank // self.groups, self.groups)
        self.load_decomposition(decomposition)
        return decomposition

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank},"
            f" stride={self.stride}, padding={self.padding}, groups={self.groups}"
        )


class LowRankLinear(nn.Module):
    """A fully-connected layer W (out×in) factorized as U·V: `first` in→K (V, no bias), then
    `second` K→out (U, with W's bias). Parameters and multiply-accumulates fall from out·in to
    K·(in + out) — and so do the gradients all-reduced each step. `dense_weight` is U·V exactly."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} must be in 1..{min(in_features, out_features)} for a {out_features}×{in_features}"
                             " linear layer")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, decomposition: Decomposition | None = None) -> "LowRankLinear":
        """The exact rank-K truncated SVD of a (trained) dense layer: the fine-tune path.
        `decomposition`, if given, is `decompose_linear(linear.weight, rank)[2]` computed by the
        caller (who wants its error)."""
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None).to(linear.weight)
        with torch.no_grad():
            if decomposition is None:
                layer.reproject_from(linear.weight)
            else:
                layer.second.weight.copy_(decomposition.horizontal.reshape(linear.out_features, rank))
                layer.first.weight.copy_(decomposition.vertical.reshape(rank, linear.in_features))
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        return layer

    @classmethod
    def from_scratch_like(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """A fresh factorized twin of `linear` whose composed map has the dense initialisation's gain:
        V ~ N(0, 1/in) keeps the input's variance, U ~ N(0, σ_W²·in/K) gives the dense output's."""
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None).to(linear.weight)
        sigma_w = float(linear.weight.detach().float().std())
        if not math.isfinite(sigma_w) or sigma_w == 0.0:
            sigma_w = 1.0 / math.sqrt(linear.in_features)
        with torch.no_grad():
            layer.first.weight.normal_(0.0, 1.0 / math.sqrt(linear.in_features))
            layer.second.weight.normal_(0.0, sigma_w * math.sqrt(linear.in_features / rank))
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    @torch.no_grad()
    def reproject_from(self, weight: torch.Tensor) -> Decomposition:
        """U, V ← the rank-K truncated SVD of `weight` (in place: an optimizer's references stay valid)."""
        u, v, decomposition = decompose_linear(weight, self.rank)
        self.second.weight.copy_(u)
        self.first.weight.copy_(v)
        return decomposition

    def reproject(self) -> Decomposition:
        """Re-balance U and V (‖U_k‖ = ‖V_k‖ = √s_k) without changing the layer's function."""
        return self.reproject_from(self.dense_weight())

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.second.bias is not None).to(self.first.weight)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if linear.bias is not None:
                linear.bias.copy_(self.second.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}"
