"""Linear probe (the CLIP paper's protocol, as CoOp runs it; doc/baselines.md).

Multinomial logistic regression on the few-shot images' ``v0``: minimise
``C · Σ_i CE(W f_i + b, y_i) + ½‖W‖²`` (the bias unpenalised, as scikit-learn's lbfgs) with
L-BFGS, up to 1000 iterations. ``C`` is chosen on validation accuracy: a coarse log grid
1e-6 … 1e6, then a finer one around the best (ties go to the smaller C, the simpler model).
The search's fits stop at a gradient of 1e-4 — scikit-learn's default ``tol``, which CoOp's
search ran with, on the same objective (its lbfgs minimises the same mean CE + λ/2 ‖W‖²);
the chosen C's fit is then continued to 1e-5.
Without validation data it falls back to C = 1 (scikit-learn's default) and says so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Baseline, BaselineData, accuracy, best_index

COARSE = [10.0 ** k for k in range(-6, 7)]
FINE = [10.0 ** (k / 3) for k in (-2, -1, 1, 2)]   # times the coarse best
FALLBACK_C = 1.0
MAX_ITER = 1000
SEARCH_TOL, FINAL_TOL = 1e-4, 1e-5   # L-BFGS gradient tolerance: while searching C, for the chosen C


class LogisticProblem:
    """The fits of one search share their inputs and work memory: the features in float64, the
    one-hot labels and three N×C buffers are made once, not once per C (at ImageNet's 16,000
    images × 1000 classes each buffer is 128 MB: allocating them per fit cost page faults, not
    arithmetic)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
        self.x = features.double()
        self.n, self.num_classes = len(self.x), num_classes
        self.one_hot = F.one_hot(labels, num_classes).double()
        self.buffers = [torch.empty(self.n, num_classes, dtype=torch.float64, device=self.x.device) for _ in range(3)]

    def fit(self, c: float, init: tuple[torch.Tensor, torch.Tensor] | None = None,
            tol: float = FINAL_TOL) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) minimising the objective above; float64, full batch, L-BFGS with a strong-Wolfe
        line search. Solved as ``mean CE + λ/2 ‖W‖²`` with λ = 1/(C·N) (the same minimiser), with
        ``W = s·V``, s = 1/√(1+λ): V's curvature is then about 1 whatever C is, so a small C (a
        large λ) converges as fast as a large one."""
        x, n, one_hot = self.x, self.n, self.one_hot
        lam = 1.0 / (c * n)
        s = (1.0 + lam) ** -0.5
        shape = (self.num_classes, x.shape[1])
        v = torch.zeros(shape, dtype=torch.float64, device=x.device) if init is None else init[0] / s
        b = torch.zeros(self.num_classes, dtype=torch.float64, device=x.device) if init is None else init[1].clone()
        optimizer = torch.optim.LBFGS([v, b], lr=1.0, max_iter=MAX_ITER, tolerance_grad=tol, tolerance_change=1e-10,
                                      history_size=20, line_search_fn="strong_wolfe")
        logits, log_p, work = self.buffers

        def objective():  # the loss and its gradient written out: no autograd graph per evaluation
            w = s * v
            torch.matmul(x, w.T, out=logits).add_(b)
            torch.log_softmax(logits, -1, out=log_p)
            loss = -torch.mul(log_p, one_hot, out=work).sum() / n + 0.5 * lam * (w * w).sum()
            residual = torch.exp(log_p, out=work).sub_(one_hot).div_(n)   # d loss / d logits
            v.grad = s * (residual.T @ x + lam * w)
            b.grad = residual.sum(0)
            return loss

        optimizer.step(objective)
        return (s * v).detach(), b.detach()


class LinearProbe(Baseline):
    name = "linear_probe"
    label = "linear probe"
    needs = ("train",)

    def fit(self, data: BaselineData) -> None:
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.problem = LogisticProblem(data.train, data.train_labels, data.num_classes)

    def _fit(self, data: BaselineData, c: float, init=None, tol: float = SEARCH_TOL):
        return self.problem.fit(c, init, tol)

    def choose(self, data: BaselineData) -> dict:
        if data.val is None:
            self.weights = self._fit(data, FALLBACK_C, tol=FINAL_TOL)
            return {"C": FALLBACK_C, "C_source": "fixed: no validation data (scikit-learn's default C)"}
        fits, scores = {}, {}
        previous = None
        for c in COARSE:  # increasing C, each fit warm-started from the previous solution
            fits[c] = previous = self._fit(data, c, previous)
            scores[c] = accuracy(self._apply(fits[c], data.val), data.val_labels)
        coarse = COARSE[best_index([scores[c] for c in COARSE])]
        for c in sorted(coarse * f for f in FINE):   # each warm-started from the nearest smaller C fitted
            below = [k for k in fits if k < c]
            fits[c] = self._fit(data, c, fits[max(below)] if below else None)
            scores[c] = accuracy(self._apply(fits[c], data.val), data.val_labels)
        candidates = sorted(fits)
        chosen = candidates[best_index([scores[c] for c in candidates])]
        self.weights = self._fit(data, chosen, fits[chosen], FINAL_TOL)
        self.problem = None   # its memory is not needed to score
        return {"C": chosen, "C_source": "val", "searched": len(candidates)}

    @staticmethod
    def _apply(weights, features: torch.Tensor) -> torch.Tensor:
        w, b = weights
        return features.double() @ w.T + b

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return self._apply(self.weights, features)
