"""Bilevel problems with exact answers, to verify estimators and to benchmark them.

* :func:`ridge_problem` — ridge regression with a scalar or per-feature L2 penalty;
  the hypergradient of the validation loss has a closed form.
* :func:`logistic_problem` — L2-regularised logistic regression; the reference
  hypergradient uses the exact Hessian and a dense solve.
* :func:`quadratic_problem` — a quadratic bilevel problem whose outer optimum φ* is
  known in closed form (for testing outer loops such as F2SA).
* :class:`InfluenceBalancing` — the linear dynamical system on which truncated
  backpropagation gets the sign of the gradient wrong (Tallec & Ollivier 2017; the
  PES paper's toy), an inner system for the truncated estimators.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from metaopt.bilevel.problem import BilevelProblem
from metaopt.optim import sgd
from metaopt.params import Params

__all__ = ["InfluenceBalancing", "ReferenceProblem", "logistic_problem", "quadratic_problem",
           "ridge_problem"]


@dataclass
class ReferenceProblem:
    """A problem, a starting point and the exact answers it admits.

    ``exact_hypergradient(phi)`` gives dF/dφ at the *exact* inner solution;
    ``exact_solution(phi)`` gives θ*(φ); ``optimum`` is φ* where known.
    """

    problem: BilevelProblem
    phi: Params
    theta0: Params
    exact_hypergradient: object
    exact_solution: object
    optimum: Params | None = None
    lipschitz: float = 1.0


def _data(n: int, d: int, generator: torch.Generator, dtype: torch.dtype,
          device: torch.device | str, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    X = torch.randn(n, d, generator=generator, dtype=dtype)
    w = torch.randn(d, generator=generator, dtype=dtype) / d**0.5
    y = X @ w + noise * torch.randn(n, generator=generator, dtype=dtype)
    return X.to(device), y.to(device)


def ridge_problem(d: int = 20, n_train: int | None = None, n_val: int | None = None, *,
                  per_feature: bool = True, penalty: float = 0.1, inner_steps: int = 100,
                  seed: int = 0, dtype: torch.dtype = torch.float64,
                  device: torch.device | str = "cpu") -> ReferenceProblem:
    """Ridge regression: inner ½‖Xw−y‖²/n + ½Σλⱼwⱼ², outer ½‖X_v w−y_v‖²/n_v.

    φ = {"penalty": λ} (shape ``[d]`` or ``[]``). The inner optimizer is gradient
    descent with step 1/L (L = largest Hessian eigenvalue), so K steps from w = 0
    converge linearly to θ*.  Closed form: with H = XᵀX/n + diag(λ),
    θ* = H⁻¹Xᵀy/n and dF/dλ = −θ* ⊙ H⁻¹∇_w f(θ*) (summed for a scalar λ).
    """
    n_train = n_train or max(2 * d, 50)
    n_val = n_val or max(2 * d, 50)
    gen = torch.Generator().manual_seed(seed)
    X, y = _data(n_train, d, gen, dtype, device)
    Xv, yv = _data(n_val, d, gen, dtype, device)
    lam = torch.full((d,) if per_feature else (), penalty, dtype=dtype, device=device)
    # Largest eigenvalue of XᵀX/n + λ, by a dense eigensolve for small d and a few
    # power iterations beyond that (the benchmark goes to d = 10⁴).
    if d <= 2000:
        L = float(torch.linalg.eigvalsh(X.T @ X / n_train).max()) + penalty
    else:
        v = torch.randn(d, generator=gen, dtype=dtype).to(device)
        for _ in range(50):
            v = X.T @ (X @ v) / n_train
            v = v / v.norm()
        L = 1.05 * float(v @ (X.T @ (X @ v)) / n_train) + penalty

    def inner(theta: Params, phi: Params) -> Tensor:
        w = theta["w"]
        r = X @ w - y
        return 0.5 * (r @ r) / n_train + 0.5 * (phi["penalty"] * w * w).sum()

    def outer(theta: Params, phi: Params) -> Tensor:
        r = Xv @ theta["w"] - yv
        return 0.5 * (r @ r) / n_val

    def solve_hessian(phi: Params, rhs: Tensor) -> Tensor:
        """H⁻¹ rhs exactly: a dense solve for d ≤ n, Woodbury's identity beyond."""
        lam_vec = phi["penalty"].expand(d) if phi["penalty"].dim() == 0 else phi["penalty"]
        if d <= n_train:
            return torch.linalg.solve(X.T @ X / n_train + torch.diag(lam_vec), rhs)
        # (D + XᵀX/n)⁻¹ = D⁻¹ − D⁻¹Xᵀ(nI + XD⁻¹Xᵀ)⁻¹XD⁻¹ with D = diag(λ).
        d_inv_rhs = rhs / lam_vec
        XD = X / lam_vec
        small = n_train * torch.eye(n_train, dtype=X.dtype, device=X.device) + XD @ X.T
        return d_inv_rhs - (XD.T @ torch.linalg.solve(small, X @ d_inv_rhs))

    def exact_solution(phi: Params) -> Params:
        return {"w": solve_hessian(phi, X.T @ y / n_train)}

    def exact_hypergradient(phi: Params) -> Params:
        w = exact_solution(phi)["w"]
        grad_w = Xv.T @ (Xv @ w - yv) / n_val
        g = -w * solve_hessian(phi, grad_w)
        return {"penalty": g if phi["penalty"].dim() else g.sum()}

    problem = BilevelProblem(inner, outer, sgd(1.0 / L), inner_steps, name="ridge")
    return ReferenceProblem(problem, {"penalty": lam},
                            {"w": torch.zeros(d, dtype=dtype, device=device)},
                            exact_hypergradient, exact_solution, lipschitz=L)


def logistic_problem(d: int = 10, n_train: int = 200, n_val: int = 200, *,
                     penalty: float = 0.5, inner_steps: int = 500, seed: int = 0,
                     dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu") -> ReferenceProblem:
    """L2-regularised logistic regression with per-feature log-penalties φ.

    inner: mean softplus(−y·Xw) + ½Σ exp(φⱼ) wⱼ²; outer: the validation logistic
    loss. The exact inner solution comes from Newton's method; the reference
    hypergradient from the dense Hessian: dF/dφ = −(∂²g/∂w∂φ)ᵀ H⁻¹ ∇_w f.
    """
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=gen, dtype=dtype)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        X = torch.randn(n, d, generator=gen, dtype=dtype)
        logits = X @ w_true
        y = torch.where(torch.rand(n, generator=gen, dtype=dtype) < torch.sigmoid(logits),
                        1.0, -1.0).to(dtype)
        return X.to(device), y.to(device)

    X, y = sample(n_train)
    Xv, yv = sample(n_val)
    log_lam = torch.full((d,), float(torch.tensor(penalty).log()), dtype=dtype, device=device)

    def inner(theta: Params, phi: Params) -> Tensor:
        w = theta["w"]
        return (torch.nn.functional.softplus(-y * (X @ w)).mean()
                + 0.5 * (phi["log_penalty"].exp() * w * w).sum())

    def outer(theta: Params, phi: Params) -> Tensor:
        return torch.nn.functional.softplus(-yv * (Xv @ theta["w"])).mean()

    L = 0.25 * float(torch.linalg.eigvalsh(X.T @ X / n_train).max()) + float(
        log_lam.exp().max()) * 4

    def exact_solution(phi: Params) -> Params:
        w = torch.zeros(d, dtype=dtype, device=device)
        for _ in range(50):
            g = torch.func.grad(lambda w_: inner({"w": w_}, phi))(w)
            H = torch.func.hessian(lambda w_: inner({"w": w_}, phi))(w)
            w = w - torch.linalg.solve(H, g)
        return {"w": w}

    def exact_hypergradient(phi: Params) -> Params:
        w = exact_solution(phi)["w"]
        H = torch.func.hessian(lambda w_: inner({"w": w_}, phi))(w)
        grad_w = torch.func.grad(lambda w_: outer({"w": w_}, phi))(w)
        u = torch.linalg.solve(H, grad_w)
        # ∂²g/∂w∂φⱼ = exp(φⱼ) wⱼ eⱼ (diagonal), so the cross term is elementwise.
        return {"log_penalty": -u * phi["log_penalty"].exp() * w}

    problem = BilevelProblem(inner, outer, sgd(1.0 / L), inner_steps, name="logistic")
    return ReferenceProblem(problem, {"log_penalty": log_lam},
                            {"w": torch.zeros(d, dtype=dtype, device=device)},
                            exact_hypergradient, exact_solution, lipschitz=L)


def quadratic_problem(d: int = 6, m: int = 4, *, mu: float = 0.1, inner_steps: int = 50,
                      seed: int = 0, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> ReferenceProblem:
    """inner ½θᵀQθ − θᵀBφ, outer ½‖θ − b‖² + ½μ‖φ‖²: θ* = Q⁻¹Bφ, and with M = Q⁻¹B
    the outer optimum is φ* = (MᵀM + μI)⁻¹Mᵀb."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=dtype)
    Q = (A @ A.T / d + torch.eye(d, dtype=dtype)).to(device)
    B = torch.randn(d, m, generator=gen, dtype=dtype).to(device)
    b = torch.randn(d, generator=gen, dtype=dtype).to(device)

    def inner(theta: Params, phi: Params) -> Tensor:
        t = theta["theta"]
        return 0.5 * t @ Q @ t - t @ (B @ phi["phi"])

    def outer(theta: Params, phi: Params) -> Tensor:
        return 0.5 * ((theta["theta"] - b) ** 2).sum() + 0.5 * mu * (phi["phi"] ** 2).sum()

    M = torch.linalg.solve(Q, B)
    optimum = torch.linalg.solve(M.T @ M + mu * torch.eye(m, dtype=dtype, device=device), M.T @ b)

    def exact_solution(phi: Params) -> Params:
        return {"theta": M @ phi["phi"]}

    def exact_hypergradient(phi: Params) -> Params:
        return {"phi": M.T @ (M @ phi["phi"] - b) + mu * phi["phi"]}

    L = float(torch.linalg.eigvalsh(Q).max())
    problem = BilevelProblem(inner, outer, sgd(1.0 / L), inner_steps, name="quadratic")
    return ReferenceProblem(problem, {"phi": torch.zeros(m, dtype=dtype, device=device)},
                            {"theta": torch.zeros(d, dtype=dtype, device=device)},
                            exact_hypergradient, exact_solution, {"phi": optimum}, lipschitz=L)


@dataclass(frozen=True)
class InfluenceBalancing:
    """``s ← A s + θ·sign``, ``A = ½(I + superdiagonal shift)``, loss ``½(s₀ − 1)²``.

    A scalar θ drives ``n`` coupled states; it pushes the first ``num_positive`` up and
    the rest down, and the downward push reaches ``s₀`` only through the chain after
    many steps. Short truncations see only the upward (short-term) influence: truncated
    backpropagation then has the wrong sign, while PES is unbiased. An
    :class:`~metaopt.bilevel.truncation.InnerSystem` (rows broadcast, no ``vmap``);
    every row starts from ``s = 1`` and ``seeds`` are unused (one task). φ is
    ``{"theta": (1,)}``. :meth:`episode_loss` is the exact objective for references.
    """

    n: int = 23
    num_positive: int = 10
    dtype: torch.dtype = torch.float64

    @functools.cached_property
    def _matrix_t(self) -> Tensor:
        return self.matrix().T.contiguous()

    @functools.cached_property
    def _signs(self) -> Tensor:
        return self.signs()

    def matrix(self) -> Tensor:
        """``A`` (dense: the product with it is the system's per-step compute)."""
        half = torch.full((self.n,), 0.5, dtype=self.dtype)
        return torch.diag(half) + torch.diag(half[1:], 1)

    def signs(self) -> Tensor:
        return torch.cat([torch.ones(self.num_positive, dtype=self.dtype),
                          -torch.ones(self.n - self.num_positive, dtype=self.dtype)])

    def init(self, phi: Params, seeds: Tensor) -> dict[str, Tensor]:
        rows = next(iter(phi.values())).shape[0]
        return {"s": torch.ones(rows, self.n, dtype=self.dtype)}

    def step(self, phi: Params, state: dict[str, Tensor], seeds: Tensor, steps: Tensor
             ) -> tuple[dict[str, Tensor], Tensor]:
        # A and the signs are built once per instance (cached): building a dense
        # (n, n) A every step cost more than the product for n = 400.
        s = state["s"] @ self._matrix_t + phi["theta"].reshape(-1, 1) * self._signs
        return {"s": s}, 0.5 * (s[:, 0] - 1) ** 2

    def episode_loss(self, theta: Tensor, steps: int) -> Tensor:
        """Sum of the step losses of one episode of ``steps`` steps from ``s = 1``."""
        state = {"s": torch.ones(1, self.n, dtype=self.dtype)}
        total = torch.zeros((), dtype=self.dtype)
        for _ in range(steps):
            state, loss = self.step({"theta": theta.reshape(1, 1)}, state, None, None)
            total = total + loss.sum()
        return total
