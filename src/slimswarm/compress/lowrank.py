"""Low-rank factorization of linear layers: plain SVD by rank or retained energy, and activation-aware SVD that
whitens by the calibration inputs (SVD-LLM: the Cholesky factor of XᵀX; or ASVD-style sqrt of per-input second
moments), so the truncation minimises the output error ||(W − W')X|| rather than ||W − W'||.

A layer becomes ``LowRankLinear`` (x → A → B, two thin linears) only where the rank saves parameters:
r·(in + out) < in·out.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SlimswarmError
from ..models.checkpoint import register_module
from ..models.llama import Linear
from .layerwise import layer_linears, set_module, walk_layers


def break_even_rank(in_features: int, out_features: int) -> int:
    """The largest rank that still stores fewer parameters than the dense weight."""
    return (in_features * out_features - 1) // (in_features + out_features)


def choose_rank(s: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """Rank from a fixed value or the smallest one whose Σσ² reaches ``energy`` of the total."""
    if (rank is None) == (energy is None):
        raise SlimswarmError("lowrank: give exactly one of rank or energy")
    if rank is not None:
        if rank < 1:
            raise SlimswarmError(f"lowrank.rank: {rank} must be >= 1")
        return min(rank, len(s))
    if not 0 < energy <= 1:
        raise SlimswarmError(f"lowrank.energy: {energy} is outside (0, 1]")
    cum = torch.cumsum(s.double().pow(2), 0)
    return min(int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)).item()) + 1, len(s))


def whitening(hessian: torch.Tensor, how: str = "cholesky", damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁻¹) with W S the matrix to truncate. cholesky: S = L, L Lᵀ = XᵀX (+ damping), so ||(W−W')X||_F =
    ||(W−W')L||_F; scale: S = diag(sqrt(E[x_j²]))."""
    H = hessian.double()
    n = H.shape[0]
    if how == "scale":
        d = torch.diag(H).clamp_min(0).sqrt()
        d = torch.where(d > 0, d, d[d > 0].mean() if (d > 0).any() else torch.ones(()))
        return torch.diag(d), torch.diag(1 / d)
    if how != "cholesky":
        raise SlimswarmError(f"lowrank.whitening: {how!r} (cholesky, scale)")
    H = H + damp * torch.diag(H).mean().clamp_min(1e-12) * torch.eye(n, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    return L, torch.linalg.solve_triangular(L, torch.eye(n, dtype=H.dtype), upper=False)


@torch.no_grad()
def svd_factors(w: torch.Tensor, rank: int | None = None, energy: float | None = None,
                hessian: torch.Tensor | None = None, how: str = "cholesky", damp: float = 0.01):
    """W [out, in] → (B [out, r], A [r, in], singular values of the matrix truncated). W ≈ B A.

    With ``hessian`` (XᵀX of the layer's inputs) the SVD is of W S and A absorbs S⁻¹ (activation-aware)."""
    W = w.detach().double()
    S = Sinv = None
    if hessian is not None:
        S, Sinv = whitening(hessian, how, damp)
        W = W @ S
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    B = U[:, :r] * root[None, :]
    A = root[:, None] * Vh[:r]
    if Sinv is not None:
        A = A @ Sinv
    return B.to(w.dtype), A.to(w.dtype), s


@register_module
class LowRankLinear(nn.Module):
    """y = B(A x) + b: ``a`` [in → rank] and ``b`` [rank → out], both our ``Linear`` (decode kernel path)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = Linear(in_features, rank, bias=False)
        self.b = Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        m = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None).to(A.dtype)
        m.a.weight.data.copy_(A)
        m.b.weight.data.copy_(B)
        if bias is not None:
            m.b.bias.data.copy_(bias.detach())
        return m

    @property
    def weight(self) -> torch.Tensor:
        return self.b.weight @ self.a.weight

    def checkpoint_spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.b.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankLinear":
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


@torch.no_grad()
def lowrank_model(model, cfg, calib: torch.Tensor | None = None) -> dict:
    """Factorize the decoder linears matching ``cfg.targets`` in place; returns {name: {rank, kept/skipped}}.

    Activation-aware runs layer by layer on calibration tokens (each layer sees the factorized layers before it)."""
    if cfg.activation_aware and calib is None:
        raise SlimswarmError("lowrank.activation_aware needs calibration text")
    meta: dict[str, dict] = {}

    def visit(li, layer, names, stats):
        for name, lin in names.items():
            H = stats[name]["H"] if stats else None
            B, A, s = svd_factors(lin.weight, cfg.rank, cfg.energy, H, cfg.whitening, cfg.damp)
            r = A.shape[0]
            limit = break_even_rank(lin.in_features, lin.out_features)
            if r > limit:
                meta[name] = {"rank": r, "replaced": False, "reason": f"rank {r} > break-even {limit}"}
                continue
            set_module(model, name, LowRankLinear.from_factors(B, A, lin.bias))
            meta[name] = {"rank": r, "replaced": True}

    walk_layers(model, calib if cfg.activation_aware else None, "low-rank", visit,
                select=lambda li, layer: layer_linears(layer, li, cfg.targets), dtype=model.dtype)
    return meta
