"""Batched Lloyd k-means with warm start, as SVG2 clusters queries and keys.

Sparse VideoGen2 (Yang et al., 2025, arXiv:2505.18875) clusters Q and K of every attention
head with k-means, initialising from random tokens once and afterwards warm-starting from the
previous step's centroids for a few iterations. Everything here is vectorised over a leading
batch dimension (batch x heads); empty clusters keep their centroid. By default every call runs
its iterations in full and reads nothing back to the host; an early-stop tolerance is an option.
On CUDA the authors' Triton k-means (PyPI ``flash-kmeans``) can run instead (``backend``).
`kmeans_rounds` takes the round count as data (a 0-d tensor), so that one compiled program runs
any count (SVG2's cold and warm starts).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

__all__ = [
    "KMEANS_BACKENDS",
    "KMeansResult",
    "assign",
    "flash_kmeans_available",
    "inertia",
    "kmeans",
    "kmeans_rounds",
    "random_init",
]

KMEANS_BACKENDS = ("torch", "flash_kmeans")


@dataclass(frozen=True)
class KMeansResult:
    """``labels`` (N, S) long, ``centroids`` (N, C, D) float32, ``counts`` (N, C) long.

    ``labels`` is the last assignment and ``centroids`` the means of those clusters (an empty
    cluster keeps the centroid it had), so ``centroids`` summarise exactly the tokens labelled.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    counts: torch.Tensor
    iterations: int


def random_init(x: torch.Tensor, num_clusters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Centroids drawn as ``num_clusters`` distinct random tokens per batch row: (N, C, D) float32."""
    n, s, _ = x.shape
    if not 1 <= num_clusters <= s:
        raise ValueError(f"num_clusters must be in [1, {s}] (the number of tokens), got {num_clusters}")
    noise = torch.rand(n, s, generator=generator)  # a CPU generator keeps the draw device-independent
    idx = noise.argsort(dim=1)[:, :num_clusters].to(x.device)
    return torch.gather(x.float(), 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) for every token: (N, S) long."""
    c_sq = centroids.square().sum(-1).unsqueeze(1)  # (N, 1, C)
    dist = torch.baddbmm(c_sq, x, centroids.transpose(1, 2), alpha=-2.0)  # ||c||^2 - 2 x.c
    return dist.argmin(-1)


def _update(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, d = centroids.shape
    rows = (labels + torch.arange(n, device=x.device).unsqueeze(1) * c).view(-1)  # one flat row per cluster
    sums = torch.zeros(n * c, d, dtype=x.dtype, device=x.device).index_add(0, rows, x.reshape(-1, d)).view(n, c, d)
    counts = torch.zeros(n, c, dtype=torch.long, device=x.device).scatter_add(1, labels, torch.ones_like(labels))
    means = sums / counts.clamp_min(1).unsqueeze(-1).to(x.dtype)
    return torch.where((counts > 0).unsqueeze(-1), means, centroids), counts


def inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances of tokens to their cluster's centroid, per batch row: (N,)."""
    picked = torch.gather(centroids, 1, labels.unsqueeze(-1).expand(-1, -1, centroids.shape[-1]))
    return (x.float() - picked).square().sum((-1, -2))


@functools.cache
def flash_kmeans_available() -> bool:
    """True when the ``flash-kmeans`` package (``flash_kmeans``) is installed."""
    return importlib.util.find_spec("flash_kmeans") is not None


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    init: torch.Tensor | None = None,
    iterations: int = 2,
    tol: float | None = None,
    generator: torch.Generator | None = None,
    backend: str = "torch",
) -> KMeansResult:
    """Lloyd's k-means on ``x`` (N, S, D), batched over N.

    ``init`` (N, C, D) warm-starts from given centroids; without it, centroids are random
    tokens. Runs ``iterations`` assignment + update rounds, with no host read of a tensor value;
    with ``tol``, eager calls stop early once no centroid moves more than ``tol`` (Euclidean),
    reading the shift on the host each round (under ``torch.compile`` the rounds all run and
    freeze once converged). Inertia never increases along the way.

    ``backend="flash_kmeans"``: the authors' Triton kernels (``flash_kmeans.batch_kmeans_Euclid``),
    CUDA only; its loop tests the shift on the host every round even without ``tol``.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (N, S, D), got shape {tuple(x.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"backend must be one of {KMEANS_BACKENDS}, got {backend!r}")
    xf = x.float()
    if init is None:
        centroids = random_init(xf, num_clusters, generator)
    else:
        if init.shape != (x.shape[0], num_clusters, x.shape[2]):
            raise ValueError(
                f"init must have shape {(x.shape[0], num_clusters, x.shape[2])}, got {tuple(init.shape)}"
            )
        centroids = init.to(device=x.device, dtype=torch.float32)
    if backend == "flash_kmeans":
        return _flash_kmeans(x, centroids, iterations, tol)
    if tol is None:
        for _ in range(iterations):
            labels = assign(xf, centroids)
            centroids, counts = _update(xf, labels, centroids)
        return KMeansResult(labels=labels, centroids=centroids, counts=counts, iterations=iterations)
    if torch.compiler.is_compiling():
        return _kmeans_traceable(xf, centroids, iterations, tol)
    done = 0
    while done < iterations:
        done += 1
        labels = assign(xf, centroids)
        new, counts = _update(xf, labels, centroids)
        shift = (new - centroids).square().sum(-1).max()
        centroids = new
        if shift.sqrt().item() <= tol:
            break
    return KMeansResult(labels=labels, centroids=centroids, counts=counts, iterations=done)


def kmeans_rounds(
    x: torch.Tensor, init: torch.Tensor, iterations: torch.Tensor, *, tol: float | None = None
) -> KMeansResult:
    """Lloyd's k-means on ``x`` (N, S, D) from ``init`` (N, C, D), for ``iterations`` rounds given
    as data: a 0-d integer CPU tensor (>= 1; its value is not checked, that would read it).

    Eager: the same rounds as `kmeans` (``int(iterations)`` reads a CPU value, no device sync).
    Under ``torch.compile`` / ``torch.export`` the rounds are a
    ``torch._higher_order_ops.while_loop`` whose counter and predicate stay on the CPU, so one
    program serves every count and its loop test reads no device value; with ``tol`` the loop
    also stops once no centroid moves more than ``tol``, as `kmeans` does (that predicate is on
    ``x``'s device: one read per round). ``iterations`` of the result is the eager round count,
    and ``-1`` under compile (the count is data there)."""
    if x.ndim != 3 or init.ndim != 3 or init.shape[0] != x.shape[0] or init.shape[2] != x.shape[2]:
        raise ValueError(f"x must be (N, S, D) and init (N, C, D), got {tuple(x.shape)}, {tuple(init.shape)}")
    integer = isinstance(iterations, torch.Tensor) and not (
        iterations.is_floating_point() or iterations.is_complex() or iterations.dtype == torch.bool
    )
    if not integer or iterations.ndim:
        raise TypeError(f"iterations must be a 0-d integer tensor, got {iterations!r}")
    xf, centroids = x.float(), init.to(device=x.device, dtype=torch.float32)
    if not torch.compiler.is_compiling():
        return kmeans(xf, centroids.shape[1], init=centroids, iterations=int(iterations), tol=tol)
    from torch._higher_order_ops.while_loop import while_loop

    zero = torch.zeros((), dtype=torch.long)  # the counter and its bound stay on the CPU
    labels = torch.zeros(xf.shape[:2], dtype=torch.long, device=xf.device)
    counts = torch.zeros(centroids.shape[:2], dtype=torch.long, device=xf.device)
    bound = iterations.to(device="cpu", dtype=torch.long)
    if tol is None:

        def go(c: torch.Tensor, lab: torch.Tensor, cnt: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return i < bound

        def step(c: torch.Tensor, lab: torch.Tensor, cnt: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return (*_round(xf, c), i + 1)

        centroids, labels, counts, _ = while_loop(go, step, (centroids, labels, counts, zero))
        return KMeansResult(labels=labels, centroids=centroids, counts=counts, iterations=-1)
    done = torch.zeros((), dtype=torch.bool, device=xf.device)

    def go_tol(c: torch.Tensor, lab: torch.Tensor, cnt: torch.Tensor, stop: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (i < bound).to(stop.device) & ~stop

    def step_tol(
        c: torch.Tensor, lab: torch.Tensor, cnt: torch.Tensor, stop: torch.Tensor, i: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        new, lab, cnt = _round(xf, c)
        return new, lab, cnt, (new - c).square().sum(-1).max().sqrt() <= tol, i + 1

    centroids, labels, counts, _, _ = while_loop(go_tol, step_tol, (centroids, labels, counts, done, zero))
    return KMeansResult(labels=labels, centroids=centroids, counts=counts, iterations=-1)


def _round(xf: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd round: the new centroids, the labels and the counts."""
    labels = assign(xf, centroids)
    new, counts = _update(xf, labels, centroids)
    return new, labels, counts


def _flash_kmeans(x: torch.Tensor, centroids: torch.Tensor, iterations: int, tol: float | None) -> KMeansResult:
    """``flash_kmeans.batch_kmeans_Euclid`` from our initial centroids, in ``x``'s dtype."""
    if x.device.type != "cuda" or not flash_kmeans_available():
        raise RuntimeError(
            "kmeans backend 'flash_kmeans' needs CUDA tensors and the flash-kmeans package "
            f"(pip install flash-kmeans); got device {x.device}, package "
            f"{'installed' if flash_kmeans_available() else 'missing'}"
        )
    from flash_kmeans import batch_kmeans_Euclid

    labels, new, done = batch_kmeans_Euclid(
        x.contiguous(), centroids.shape[1], max_iters=iterations, tol=0.0 if tol is None else tol,
        init_centroids=centroids.to(x.dtype).contiguous(),
    )  # fmt: skip
    labels = labels.long()
    counts = torch.zeros(centroids.shape[:2], dtype=torch.long, device=x.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    return KMeansResult(labels=labels, centroids=new.float(), counts=counts, iterations=int(done))


def _kmeans_traceable(xf: torch.Tensor, centroids: torch.Tensor, iterations: int, tol: float) -> KMeansResult:
    """The same Lloyd iterations without reading the shift on the host (no graph break under
    ``torch.compile``): every round runs, and once the shift has fallen to ``tol`` the labels,
    counts and centroids stop changing, so the result equals the early-stopping loop's.
    ``iterations`` reports the rounds run (an upper bound of the eager count)."""
    labels = counts = None
    done = torch.zeros((), dtype=torch.bool, device=xf.device)
    for _ in range(iterations):
        new_labels = assign(xf, centroids)
        new, new_counts = _update(xf, new_labels, centroids)
        shift = (new - centroids).square().sum(-1).max().sqrt()
        if labels is None:
            labels, counts = new_labels, new_counts
        else:
            labels = torch.where(done, labels, new_labels)
            counts = torch.where(done, counts, new_counts)
        centroids = torch.where(done, centroids, new)
        done = done | (shift <= tol)
    return KMeansResult(labels=labels, centroids=centroids, counts=counts, iterations=iterations)
