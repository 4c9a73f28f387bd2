"""SparseGPT's reference sweep in float64, for the tests of hesse's SparseGPT and OBS sweeps."""

import torch

DT = torch.float64


def sparsegpt_reference(W, H, sparsity, pattern, block, percdamp=0.01):
    """SparseGPT's ``fasterprune`` (IST-DASLab/sparsegpt, Alg. 1 of the paper) in float64.

    Unstructured: each block of columns prunes its ``sparsity`` fraction of smallest
    :math:`w^2 / [H^{-1}]_{qq}^2` on entering it (exactly ``round(s r c1) - round(s r c0)``
    weights; the reference code's ``tmp <= thresh`` prunes one more). ``n:m``: each group of
    ``m`` columns when the sweep reaches it.
    """
    W, H = W.clone(), H.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * H.diagonal().mean() * torch.eye(len(H), dtype=DT)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    rows = W.shape[0]
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            tmp = W1**2 / Hinv1.diagonal()[None, :] ** 2
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            pruned.view(-1)[tmp.reshape(-1).argsort()[:k]] = True
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                tmp = W1[:, i : i + m] ** 2 / Hinv1.diagonal()[i : i + m][None, :] ** 2
                pruned.scatter_(1, i + torch.topk(tmp, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = torch.where(pruned[:, i], 0.0, w)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W
