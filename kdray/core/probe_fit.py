"""Fitting probes: L2-penalised multinomial logistic regressions on pooled features, many at once, and their
strength chosen on data (``l2: auto``) by stratified k-fold cross-validation.

A probe minimises ``mean cross-entropy + l2/2 * ||W||^2`` (the intercept is not penalised) on its layer's pooled
outputs of the labelled training examples, standardised by their mean and standard deviation
(:func:`standardisation`). With ``l2: auto`` the strength is picked per layer from :data:`L2_GRID` by stratified
k-fold cross-validation on those examples only (:func:`stratified_folds`): the strength with the best mean held-out
accuracy wins, the stronger on a tie, and the final probe is fitted on all of them with that strength scaled by the
share of the examples a fold trained on (:attr:`L2Choice.refit_l2`, the strength reported). The folds share the
standardisation of all the labelled examples (the one the final probe uses). The reference is scikit-learn's
``LogisticRegressionCV(Cs, cv=StratifiedKFold)`` on standardised features: its ``C`` is ``l2 = 1 / (C * n_train)``
here (for two classes scikit-learn fits one weight vector, which makes its ``l2`` half of kdray's two-row one).

The fit (:func:`fit_linear`): each layer's standardised features are rotated onto their principal axes (an exact
change of basis for an L2-penalised linear model: the optimum lies in the span of the examples, so at most
``min(examples, dims)`` coordinates are kept), padded to a common width with zero columns (which an L2 fit leaves at
zero), and every problem (layer x fold x strength for the cross-validation, then one per layer for the final probes)
is solved by one batched L-BFGS with a step size, a history and a stopping test per problem (largest gradient entry
of the mean loss below :data:`TOL`, scikit-learn's), preconditioned by the curvature of each principal axis. Plain
PyTorch, on the features' device.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("kdray")

AUTO = "auto"  # the L2 strength chosen on data
L2_GRID = tuple(10.0 ** (e / 2) for e in range(-10, 3))  # 1e-5 ... 10, half a decade apart (13 strengths)
FOLDS = 5
TOL = 1e-4  # largest gradient entry of the mean loss at which a fit has converged (scikit-learn's lbfgs tol)
_HISTORY = 10  # L-BFGS pairs kept per problem
_CHUNK_FLOATS = 2 ** 26  # the solver's state for one batch of layers stays below about 256 MB
_ONE_THREAD_MACS = 5e8  # multiply-adds per objective below which a batch runs on one CPU thread


@dataclass(frozen=True)
class L2Choice:
    """The strength chosen for one layer and how: ``folds`` of cross-validation (0: none was possible, the
    fallback of :func:`fallback_l2`) and the mean held-out accuracy at the chosen strength."""

    l2: float
    folds: int
    cv_acc: float

    @property
    def refit_l2(self) -> float:
        """The strength of the final fit on all the labelled examples: the chosen one times the share of them a
        fold trained on, so that ``l2 * examples`` (the penalty against the summed loss) stays what the folds tried,
        as in scikit-learn's refit, which keeps ``C``."""
        return self.l2 * (self.folds - 1) / self.folds if self.folds else self.l2


@dataclass
class LinearProbe:
    """A fitted probe's numbers: ``logits = ((z - mean) / std) @ weight.T + bias``."""

    mean: Tensor  # (D,)
    std: Tensor  # (D,)
    weight: Tensor  # (C, D)
    bias: Tensor  # (C,)
    l2: float  # the strength fitted
    choice: Optional[L2Choice] = None  # how it was chosen, for l2: auto


def standardisation(z: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and (clamped) standard deviation a probe standardises its (N, D) features with."""
    if len(z) < 2:
        return z.sum(0), torch.ones(z.shape[1:], device=z.device)  # the one example itself, or zeros
    return z.mean(0), z.std(0).clamp_min(1e-6)


def fallback_l2(n: int) -> float:
    """The strength used when cross-validation is impossible: scikit-learn's default ``C = 1``, ``l2 = 1 / n``."""
    return 1.0 / max(n, 1)


def stratified_folds(y: Tensor, seed: int = 0) -> tuple[Tensor, int]:
    """(fold of every example, number of folds): ``min(FOLDS, smallest class count)`` folds, each class spread
    evenly over them in a seeded random order. Classes with a single labelled example are in every training fold
    (fold -1, never held out). 0 folds when no class has two labelled examples."""
    counts = torch.bincount(y.cpu(), minlength=1)
    held = counts >= 2
    if not bool(held.any()):
        return torch.full_like(y, -1), 0
    k = int(min(FOLDS, int(counts[held].min())))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    order = order[torch.argsort(y.cpu()[order], stable=True)]  # by class, random within a class
    order = order[held[y.cpu()[order]]]
    folds = torch.full((len(y),), -1, dtype=torch.long)
    folds[order] = torch.arange(len(order)) % k
    return folds.to(y.device), k


@dataclass
class _Basis:
    """Standardised features on their principal axes: ``z = zs @ v``, ``s2`` the squared norm of each column."""

    z: Tensor  # (N, r)
    s2: Tensor  # (r,)
    v: Tensor  # (D, r), orthonormal columns


def principal_basis(zs: Tensor) -> _Basis:
    """The principal axes of standardised (N, D) features, r = their numerical rank (at most min(N, D))."""
    n, d = zs.shape
    gram = d > n  # the smaller of the two: the examples' Gram matrix, or the features' scatter matrix
    evals, vecs = torch.linalg.eigh(zs @ zs.T if gram else zs.T @ zs)
    keep = evals > evals.max().clamp_min(0) * 1e-6  # float32: smaller directions are rounding noise
    evals, vecs = evals[keep], vecs[:, keep]
    if gram:
        s = evals.sqrt()
        return _Basis(vecs * s, evals, (zs.T @ vecs) / s)
    return _Basis(zs @ vecs, evals, vecs)


@dataclass
class _Batch:
    """Problems (layer, fold x strength) of one batch of layers: inputs with a bias column, labels, loss weights."""

    z: Tensor  # (L, N, R + 1); the last column is ones (the unpenalised intercept)
    y: Tensor  # (N,)
    onehot: Tensor  # (N, C)
    weight: Tensor  # (N, P): 1 / n_train of the problem's fold for its training examples, else 0
    l2: Tensor  # (L, P)
    precond: Tensor  # (L, P, 1, R + 1): approximate inverse curvature per coordinate
    num_classes: int

    def loss(self, theta: Tensor, grad: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Per-problem objective (L, P) and its gradient (L, P, C, R + 1)."""
        L, P, C, R1 = theta.shape
        n = self.z.shape[1]
        logits = torch.bmm(self.z, theta.reshape(L, P * C, R1).transpose(1, 2)).view(L, n, P, C)
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, self.y.view(1, n, 1, 1).expand(L, n, P, 1)).squeeze(-1)  # (L, N, P)
        w = theta[..., :-1]
        f = (nll * self.weight).sum(1) + 0.5 * self.l2 * w.pow(2).sum((-1, -2))
        if not grad:
            return f, None
        r = logp.exp_().sub_(self.onehot.view(1, n, 1, C)).mul_(self.weight.unsqueeze(-1))
        g = torch.bmm(r.view(L, n, P * C).transpose(1, 2), self.z).view(L, P, C, R1)
        g[..., :-1] += self.l2[..., None, None] * w
        return f, g

    def select(self, keep: Tensor) -> "_Batch":
        """The problems ``keep`` (a mask over P) only."""
        return _Batch(self.z, self.y, self.onehot, self.weight[:, keep], self.l2[:, keep], self.precond[:, keep],
                      self.num_classes)

    def predictions(self, theta: Tensor) -> Tensor:
        L, P, C, R1 = theta.shape
        return torch.bmm(self.z, theta.reshape(L, P * C, R1).transpose(1, 2)).view(L, -1, P, C).argmax(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((-1, -2))


def _direction(g: Tensor, precond: Tensor, hist: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """The preconditioned L-BFGS direction per problem (two-loop recursion)."""
    q, alphas = g.clone(), []
    for s, yv, rho in reversed(hist):
        a = rho * _dot(s, q)
        q -= a[..., None, None] * yv
        alphas.append(a)
    if hist:
        s, yv, _ = hist[-1]
        gamma = _dot(s, yv) / _dot(yv, precond * yv).clamp_min(1e-30)
        q = gamma[..., None, None] * precond * q
    else:
        q = precond * q
    for (s, yv, rho), a in zip(hist, reversed(alphas)):
        b = rho * _dot(yv, q)
        q += (a - b)[..., None, None] * s
    return -q


def solve(batch: _Batch, max_iter: int, tol: float = TOL) -> tuple[Tensor, int, float]:
    """All problems of ``batch`` by batched L-BFGS from zero, each with its own backtracking (Armijo) step and its
    own stop (largest gradient entry below ``tol``, no progress, or ``max_iter`` iterations); the problems every
    layer has finished leave the batch. The weights (L, P, C, R + 1), the iterations run, and the fraction of
    problems that converged. A small batch on the CPU runs on one thread: its many small steps would spend more
    waiting for the other threads than they save (on a busy machine, many times more)."""
    L, n, R1 = batch.z.shape
    small = batch.z.device.type == "cpu" and L * n * R1 * batch.weight.shape[1] * batch.num_classes < _ONE_THREAD_MACS
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        return _solve(batch, max_iter, tol)
    finally:
        torch.set_num_threads(threads)


def _solve(batch: _Batch, max_iter: int, tol: float) -> tuple[Tensor, int, float]:
    L, _, R1 = batch.z.shape
    P, C = batch.weight.shape[1], batch.num_classes
    out = torch.zeros(L, P, C, R1, device=batch.z.device)
    converged = torch.zeros(L, P, dtype=torch.bool, device=batch.z.device)
    cols = torch.arange(P, device=batch.z.device)  # the problems still in the batch
    theta = out.clone()
    f, g = batch.loss(theta)
    active = g.abs().amax((-1, -2)) > tol
    converged |= ~active
    hist: list[tuple[Tensor, Tensor, Tensor]] = []
    it = 0
    while it < max_iter and bool(active.any()):
        keep = active.any(0)
        if int(keep.sum()) <= 0.75 * len(cols):  # drop the finished problems
            out[:, cols[~keep]] = theta[:, ~keep]
            cols, theta, f, g, active = cols[keep], theta[:, keep], f[:, keep], g[:, keep], active[:, keep]
            hist = [(s[:, keep], yv[:, keep], rho[:, keep]) for s, yv, rho in hist]
            batch = batch.select(keep)
        it += 1
        theta, f, g, hist, done, moved = _step(batch, theta, f, g, hist, active, tol)
        converged[:, cols] |= active & done
        active &= ~done & moved
    out[:, cols] = theta
    return out, it, float(converged.float().mean())


def _step(batch: _Batch, theta: Tensor, f: Tensor, g: Tensor, hist: list, active: Tensor, tol: float):
    """One L-BFGS iteration of the active problems: (weights, objective, gradient, history, converged, moved)."""
    d = _direction(g, batch.precond, hist)
    slope = _dot(g, d)
    bad = slope >= 0  # not a descent direction: the preconditioned gradient instead
    if bool(bad.any()):
        d = torch.where(bad[..., None, None], -batch.precond * g, d)
        slope = _dot(g, d)
    t = active.float()
    f_new, _ = batch.loss(theta + t[..., None, None] * d, grad=False)
    for _ in range(30):  # backtracking: quarter the step of the problems whose objective did not fall enough
        fail = active & (t > 0) & ~(f_new <= f + 1e-4 * t * slope)
        if not bool(fail.any()):
            break
        t = torch.where(fail, t * 0.25, t)
        cols = fail.any(0)  # only the problems of these columns are evaluated again
        f_new[:, cols], _ = batch.select(cols).loss(theta[:, cols] + t[:, cols, None, None] * d[:, cols], grad=False)
    else:
        t = torch.where(fail, torch.zeros_like(t), t)
    step = t[..., None, None] * d
    theta = theta + step
    f_new, g_new = batch.loss(theta)
    y_diff = g_new - g
    sy = _dot(step, y_diff)
    rho = torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))  # pairs without curvature: skipped
    hist = (hist + [(step, y_diff, rho)])[-_HISTORY:]
    progress = (f - f_new).abs() > 1e-7 * torch.maximum(f.abs(), f_new.abs()).clamp_min(1.0)
    done = g_new.abs().amax((-1, -2)) <= tol
    return theta, f_new, g_new, hist, done, progress & (t > 0)


def _problems(bases: list[_Basis], y: Tensor, weight: Tensor, l2: Tensor, num_classes: int) -> _Batch:
    """The problems of some layers: ``weight`` (N, P) the loss weight of every example in each problem, ``l2``
    (L, P) their strengths."""
    n, dev = len(y), y.device
    width = max(b.z.shape[1] for b in bases)
    z = torch.zeros(len(bases), n, width + 1, device=dev)
    s2 = torch.zeros(len(bases), width + 1, device=dev)
    for i, b in enumerate(bases):
        z[i, :, :b.z.shape[1]] = b.z
        s2[i, :b.s2.shape[0]] = b.s2
    z[:, :, -1] = 1.0
    s2[:, -1] = n
    penalised = torch.ones(width + 1, device=dev)
    penalised[-1] = 0
    curvature = s2 / (n * num_classes)  # softmax curvature at the start (uniform predictions), per example
    precond = 1.0 / (curvature[:, None, :] + l2[:, :, None] * penalised)
    return _Batch(z, y, F.one_hot(y, num_classes).float(), weight, l2, precond.unsqueeze(2), num_classes)


def _layer_chunks(widths: list[int], n: int, problems: int, num_classes: int) -> list[list[int]]:
    """Layers grouped so the solver's state for each group stays below the budget."""
    per_layer = [(2 * _HISTORY + 8) * problems * num_classes * (w + 1) + 4 * n * problems * num_classes
                 for w in widths]
    chunks, cur, size = [], [], 0
    for i, s in enumerate(per_layer):
        if cur and size + s > _CHUNK_FLOATS:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += s
    return chunks + ([cur] if cur else [])


def cross_validate(bases: list[_Basis], y: Tensor, num_classes: int, max_iter: int,
                   grid: Sequence[float] = L2_GRID) -> list[L2Choice]:
    """The strength of each layer's probe from ``grid`` by stratified cross-validation, every (layer, fold,
    strength) problem fitted together. Without two labelled examples in any class there is nothing to hold out:
    :func:`fallback_l2`, said in the log."""
    t0 = time.perf_counter()
    folds, k = stratified_folds(y)
    if k == 0:
        l2 = fallback_l2(len(y))
        log.warning("probe l2 auto: no class has 2 labelled examples (%d in all), so nothing can be held out; "
                    "using l2 = 1/n = %.3g (scikit-learn's default C = 1)", len(y), l2)
        return [L2Choice(l2, 0, math.nan) for _ in bases]
    if singles := int((folds < 0).sum()):
        log.info("probe l2 auto: %d labelled example(s) alone in their class stay in every training fold", singles)
    G, n = len(grid), len(y)
    held = torch.stack([(folds == f) for f in range(k)]).float()  # (k, N)
    train = (1 - held) / (1 - held).sum(1, keepdim=True)
    weight = train.repeat_interleave(G, 0).T.contiguous()  # (N, k * G): problem p is fold p // G, strength p % G
    strengths = torch.tensor(list(grid), dtype=torch.float32, device=y.device).repeat(k)
    acc = torch.empty(len(bases), G, dtype=torch.float64)
    iters, converged = 0, 0.0
    for chunk in _layer_chunks([b.z.shape[1] for b in bases], n, k * G, num_classes):
        batch = _problems([bases[i] for i in chunk], y, weight, strengths.expand(len(chunk), -1), num_classes)
        theta, it, conv = solve(batch, max_iter)
        iters, converged = max(iters, it), converged + conv * len(chunk)
        correct = (batch.predictions(theta) == y.view(1, -1, 1)).double()  # (L, N, k * G); counts add up exactly
        fold_acc = torch.einsum("lnfg,fn->lfg", correct.view(len(chunk), n, k, G), held.double())
        acc[chunk] = (fold_acc / held.double().sum(1).view(1, k, 1)).mean(1).cpu()
    log.info("probe l2 auto: %d strengths x %d folds x %d layers cross-validated on %d labelled examples in %.1fs "
             "(%d L-BFGS iterations at most, %.0f%% of the fits converged)", G, k, len(bases), n,
             time.perf_counter() - t0, iters, 100 * converged / len(bases))
    return [_pick(a, grid, k) for a in acc]


def fit_linear(feats: Sequence[Tensor], y: Tensor, num_classes: int, l2s: Sequence[Union[float, str]],
               max_iter: int = 100) -> list[LinearProbe]:
    """A probe on each of ``feats`` ((N, D_i) pooled features of the same N labelled training examples, labels
    ``y``) with strength ``l2s[i]``: a number, or :data:`AUTO` (:func:`cross_validate` over the auto layers
    together); all the final fits are solved together too."""
    y = y.long()
    n = len(y)
    feats = [z.float() for z in feats]
    stats = [standardisation(z) for z in feats]
    if n == 0:  # nothing to fit: zero weights
        return [LinearProbe(m, s, z.new_zeros(num_classes, z.shape[1]), z.new_zeros(num_classes),
                            fallback_l2(0) if l2 == AUTO else float(l2)) for z, (m, s), l2 in zip(feats, stats, l2s)]
    bases = [principal_basis((z - m) / s) for z, (m, s) in zip(feats, stats)]
    auto = [i for i, l2 in enumerate(l2s) if l2 == AUTO]
    choices = dict(zip(auto, cross_validate([bases[i] for i in auto], y, num_classes, max_iter))) if auto else {}
    l2 = [choices[i].refit_l2 if i in choices else float(l2s[i]) for i in range(len(feats))]
    out: list[Optional[LinearProbe]] = [None] * len(feats)
    everyone = torch.full((n, 1), 1.0 / n, device=y.device)
    unconverged = 0.0
    for chunk in _layer_chunks([b.z.shape[1] for b in bases], n, 1, num_classes):
        strengths = torch.tensor([[l2[i]] for i in chunk], dtype=torch.float32, device=y.device)
        theta, _, conv = solve(_problems([bases[i] for i in chunk], y, everyone, strengths, num_classes), max_iter)
        unconverged += (1 - conv) * len(chunk)
        for j, i in enumerate(chunk):
            r = bases[i].z.shape[1]
            w = theta[j, 0, :, :r] @ bases[i].v.T
            out[i] = LinearProbe(stats[i][0], stats[i][1], w, theta[j, 0, :, -1].clone(), l2[i], choices.get(i))
    if round(unconverged):
        log.info("probe fits: %d of %d stopped at max_iter = %d before converging (a weak l2 converges slowly)",
                 round(unconverged), len(feats), max_iter)
    return out  # type: ignore[return-value]


def _pick(acc: Tensor, grid: Sequence[float], k: int) -> L2Choice:
    """The strongest strength whose mean held-out accuracy is the best."""
    best = float(acc.max())
    i = max((j for j in range(len(grid)) if float(acc[j]) >= best - 1e-9), key=lambda j: grid[j])  # exact ties
    return L2Choice(float(grid[i]), k, float(acc[i]))
