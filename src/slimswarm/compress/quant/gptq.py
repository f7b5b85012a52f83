"""GPTQ: quantize a weight column by column, pushing each column's error onto the not-yet-quantized ones through
the inverse Hessian of the layer's inputs (Frantar et al., 2022). Pure functions on tensors."""

from __future__ import annotations

import torch

from .rtn import check_grouping, minmax_params, quantize_codes
from .search import search_params


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  act_order: bool = False, damp: float = 0.01, block: int = 128,
                  scale_dtype: torch.dtype = torch.float16, search: bool = False, importance: bool = False):
    """Weight [out, in] and H = X^T X [in, in] → (codes uint8 [out, in], scales [out, G], zeros uint8 [out, G]).

    ``search``: each group's scale and zero point come from a range search (``search.search_params``) instead of
    min-max, weighted by the input second moments diag(H) when ``importance``. With ``act_order`` the groups are
    static: their parameters come from the original columns, so each group stays contiguous in storage and every
    group kernel runs the result; only the order in which columns are rounded (and errors pushed) changes."""
    W = w.detach().float().clone()
    out, n = W.shape
    gs = check_grouping(n, group_size)
    G = n // gs
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    imp_all = torch.diag(H).clamp_min(0) if importance else None

    def params(cols: torch.Tensor, c0: int = 0):
        if search:
            imp = None if imp_all is None else imp_all[c0 : c0 + cols.shape[1]]
            s, z = search_params(cols, bits, symmetric, imp, scale_dtype=scale_dtype)
        else:
            s, z = minmax_params(cols, bits, symmetric)
        return s.to(scale_dtype).float(), z

    scales = torch.zeros(out, G)
    zeros = torch.zeros(out, G)
    if act_order:
        # Static groups: parameters from the original columns, so groups stay contiguous in storage.
        for g in range(G):
            scales[:, g], zeros[:, g] = params(W[:, g * gs : (g + 1) * gs], g * gs)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(n)
    group_of = perm // gs  # original group of each (permuted) column

    H += damp * torch.mean(torch.diag(H)) * torch.eye(n)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    codes = torch.zeros(out, n)
    block = gs if (not act_order and gs < n) else block  # group boundaries at block starts
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        if not act_order and gs < n:
            scales[:, i1 // gs], zeros[:, i1 // gs] = params(W1, i1)  # this group, with the errors pushed so far
        elif not act_order and i1 == 0:
            scales[:, 0], zeros[:, 0] = params(W)  # per-channel
        for i in range(i2 - i1):
            col = W1[:, i]
            g = group_of[i1 + i]
            s, z = scales[:, g], zeros[:, g]
            q = quantize_codes(col[:, None], s, z, bits)[:, 0]
            codes[:, i1 + i] = q
            err = (col - (q - z) * s) / Hb[i, i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.uint8), scales.to(scale_dtype), zeros.to(torch.uint8)
