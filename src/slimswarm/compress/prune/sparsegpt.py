"""SparseGPT (Frantar & Alistarh, 2023): prune column by column and push each removed weight's error onto the later
columns through the inverse Hessian of the layer's inputs (OBS update), in blocks, as gptq.py does for rounding."""

from __future__ import annotations

import torch

from .masks import check_nm, check_sparsity, n_pruned, nm_of


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H⁻¹, dead-input mask), with GPTQ's damping of the diagonal."""
    H = H.float().clone()
    n = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), dead


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    pattern: str | tuple[int, int] | None = "unstructured",
                    block: int = 128, damp: float = 0.01, name: str = "weight") -> torch.Tensor:
    """Weight [out, in] and H = XᵀX [in, in] → the pruned, reconstructed weight (same dtype).

    Unstructured: each row drops its ``sparsity`` fraction within every block of columns, chosen by the OBS
    saliency w² / [H⁻¹]_jj² on the weights as updated so far. N:M: the saliency picks M−N of every M columns."""
    nm = nm_of(pattern)
    if nm is None:
        check_sparsity(sparsity, f"{name}: sparsity")
    W = w.detach().float().clone()
    out, n = W.shape
    if nm is not None:
        check_nm(n, nm, name)
        block = max(nm[1], block - block % nm[1])  # groups never straddle a block
    Hinv, dead = _inverse_hessian_factor(hessian, damp)
    W[:, dead] = 0
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hb)
        drop = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # Cumulative rounding keeps the whole row's count exact: round(s·i2) − round(s·i1) in this block.
            k = n_pruned(i2, sparsity) - n_pruned(i1, sparsity)
            if k:
                sal = W1.pow(2) / d.pow(2)[None, :]
                drop.scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :k], True)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = W1[:, i : i + nm[1]].pow(2) / d[i : i + nm[1]].pow(2)[None, :]
                idx = torch.topk(sal, nm[1] - nm[0], dim=1, largest=False).indices
                drop[:, i : i + nm[1]].scatter_(1, idx, True)
            col = W1[:, i]
            err = col * drop[:, i] / Hb[i, i]  # the removed weights' error, scaled by the OBS pivot
            W1[:, i:].addr_(err, Hb[i, i:], alpha=-1)
            W1[:, i].masked_fill_(drop[:, i], 0)  # exactly zero where dropped, whatever the update's rounding
            Err[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)
