"""Fitting contextual TPA factors to a source model's key, value or query projection.

A source projection gives, per token, ``M_t = W x_t`` reshaped to ``[H, D]`` (``W [H, D, C]``; GQA
sources repeat each key/value head over its group first). TPA with contextual head and feature factors
replaces it by ``M̂_t = (1/R) A(x_t)^T B(x_t)`` with ``A(x) = W_a x`` (``W_a [R, H, C]``) and
``B(x) = W_b x`` (``W_b [R, D, C]``): a bilinear form of ``x``, so no weight-only SVD gives it
exactly. Two initialisations are fitted on calibration inputs ``X [N, C]`` and the one with the
smaller error on held-out tokens is kept:

- ``svd``: the rank-R SVD of ``W Σ^{1/2}`` unfolded to ``[H, D*C]`` (``Σ`` the input second moment,
  so the error is measured on the inputs the layer sees) gives fixed head factors ``A_0`` and feature
  weights; the contextual head factor becomes ``A(x) = A_0 (w·x)`` with ``w`` the least-squares fit of
  ``w·x_t ≈ 1``.
- ``als``: alternating least squares from ``svd``: with ``A`` fixed, ``M̂`` is linear in ``W_b``
  (and with ``B`` fixed, in ``W_a``), so each half-step solves ridge-regularised normal equations of
  ``sum_t ||M̂_t - M_t||_F^2``.

RoPE rotates the rows of ``B`` and of ``M`` alike (an orthogonal map per position), so fitting the
unrotated projections fits the rotated ones with the same error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("svd", "als")


@dataclass
class FactorFit:
    """Weights of one contextual factor pair and its error.

    Attributes:
        w_a: ``[R, H, C]`` head-factor weights. w_b: ``[R, D, C]`` feature-factor weights.
        method: which initialisation produced them.
        rel_error: ``||M̂ - M||_F / ||M||_F`` on the held-out tokens.
    """

    w_a: torch.Tensor
    w_b: torch.Tensor
    method: str
    rel_error: float


def reconstruct(w_a: torch.Tensor, w_b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(1/R) A(x)^T B(x)``: ``w_a [R, H, C]``, ``w_b [R, D, C]``, ``x [N, C]`` -> ``[N, H, D]``."""
    a = torch.einsum("rhc,nc->nrh", w_a, x)
    b = torch.einsum("rdc,nc->nrd", w_b, x)
    return torch.einsum("nrh,nrd->nhd", a, b) / w_a.shape[0]


def relative_error(w_a: torch.Tensor, w_b: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> float:
    target = torch.einsum("hdc,nc->nhd", weight, x)
    return float((reconstruct(w_a, w_b, x) - target).norm() / target.norm().clamp_min(1e-30))


def _balance(w_a: torch.Tensor, w_b: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale ``a_r`` by ``s_r`` and ``b_r`` by ``1/s_r`` so both have the same RMS on ``x`` (same product)."""
    a = torch.einsum("rhc,nc->nrh", w_a, x).pow(2).mean(dim=(0, 2)).sqrt()
    b = torch.einsum("rdc,nc->nrd", w_b, x).pow(2).mean(dim=(0, 2)).sqrt()
    scale = (b / a.clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return w_a * scale[:, None, None], w_b / scale[:, None, None]


def svd_init(weight: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``svd`` initialisation (module docstring). ``weight [H, D, C]``, ``x [N, C]`` (float64)."""
    heads, dim, width = weight.shape
    second = x.T @ x / x.shape[0]
    evals, evecs = torch.linalg.eigh(second)
    evals = evals.clamp_min(evals.max() * 1e-12)
    root, inv_root = (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T
    u, s, vh = torch.linalg.svd((weight @ root).reshape(heads, dim * width), full_matrices=False)
    a0 = u[:, :rank].T  # [R, H]
    feat = (s[:rank, None] * vh[:rank]).reshape(rank, dim, width) @ inv_root  # [R, D, C]
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    w = torch.linalg.lstsq(x, ones).solution[:, 0]  # w . x_t ~ 1
    w_a = a0[:, :, None] * w[None, None, :]
    return _balance(w_a, feat * rank, x)


def _solve_linear_factor(fixed: torch.Tensor, target: torch.Tensor, x: torch.Tensor, ridge: float) -> torch.Tensor:
    """Weights ``W [R, P, C]`` minimising ``sum_t ||(1/R) F_t^T (W x_t) - T_t||^2`` for fixed factors
    ``F_t = fixed [N, R, Q]`` and targets ``T_t = target [N, Q, P]``; ``x [N, C]``."""
    n, rank, _ = fixed.shape
    width, out = x.shape[1], target.shape[2]
    gram_f = torch.einsum("nrq,nsq->nrs", fixed, fixed) / rank**2  # [N, R, R]
    gram = torch.empty(rank, width, rank, width, dtype=x.dtype, device=x.device)
    for r in range(rank):
        for s in range(r, rank):
            block = (x * gram_f[:, r, s, None]).T @ x
            gram[r, :, s, :] = block
            gram[s, :, r, :] = block.T
    gram = gram.reshape(rank * width, rank * width)
    rhs = torch.einsum("nc,nrp->rcp", x, torch.einsum("nrq,nqp->nrp", fixed, target)) / rank
    lam = ridge * gram.diagonal().mean().clamp_min(1e-30)
    gram.diagonal().add_(lam)
    theta = torch.linalg.solve(gram, rhs.reshape(rank * width, out))  # [(R C), P]
    return theta.reshape(rank, width, out).permute(0, 2, 1).contiguous()  # [R, P, C]


def als_refine(weight: torch.Tensor, x: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, *, iterations: int = 6,
               ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``als`` refinement (module docstring), from ``w_a [R, H, C]``, ``w_b [R, D, C]``."""
    target = torch.einsum("hdc,nc->nhd", weight, x)  # [N, H, D]
    for _ in range(iterations):
        a = torch.einsum("rhc,nc->nrh", w_a, x)
        w_b = _solve_linear_factor(a, target, x, ridge)  # B given A: F = A [N, R, H], T = M [N, H, D]
        b = torch.einsum("rdc,nc->nrd", w_b, x)
        w_a = _solve_linear_factor(b, target.transpose(1, 2), x, ridge)  # A given B: T = M^T [N, D, H]
    return _balance(w_a, w_b, x)


def fit_factors(weight: torch.Tensor, x_fit: torch.Tensor, x_held: torch.Tensor, rank: int,
                methods: tuple[str, ...] = METHODS) -> tuple[FactorFit, dict[str, float]]:
    """Fit every method in ``methods`` on ``x_fit [N, C]`` and keep the best on ``x_held [M, C]``.

    Args:
        weight: ``[H, D, C]`` source projection (float64 recommended).
        rank: R, at least 1.

    Returns:
        The best :class:`FactorFit` and the held-out relative error of every method tried.
    """
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"fit methods must be a non-empty subset of {METHODS}, got {methods}")
    fits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    w_a, w_b = svd_init(weight, x_fit, rank)
    if "svd" in methods:
        fits["svd"] = (w_a, w_b)
    if "als" in methods:
        fits["als"] = als_refine(weight, x_fit, w_a, w_b)
    errors = {name: relative_error(a, b, weight, x_held) for name, (a, b) in fits.items()}
    best = min(errors, key=errors.get)
    return FactorFit(*fits[best], method=best, rel_error=errors[best]), errors
