"""The infusion chain's importance-sampled lower bound (`inf.lower_bound`) against a reference
written from the definition in docs/infusion.md (not from infusion.py): float64, explicit loops,
log N(x; m, v) from its formula, on a 3-pixel problem with a hand-made operator.

    log p(x, z) = log p_0(z_0) + Σ_{t=1}^{T-1} log p_t(z_t | z_{t-1}) + log p_T(x | z_{T-1})
    log q(z | x) = log p_0(z_0) + Σ_{t=1}^{T-1} Σ_i log[(1-α_t) p_t(z_t,i | z_{t-1}) + α_t N(z_t,i; x_i, s²)]
    bound(x) = log (1/K) Σ_k exp(log p(x, z^k) - log q(z^k | x)),  z^k ~ q(· | x)
"""

from __future__ import annotations

import math

import pytest
import torch

from ssl_lab.gen import infusion as inf

SHAPE = (1, 1, 3)  # D = 3 pixels
D = 3
M0, S0 = [0.5, 0.3, 0.7], [0.3, 0.2, 0.25]  # the prior p_0: per-pixel mean and std


def log_normal(x: float, m: float, v: float) -> float:
    return -0.5 * math.log(2 * math.pi * v) - (x - m) ** 2 / (2 * v)


def log_sum_exp(terms: list[float]) -> float:
    top = max(terms)
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def ref_op(coef: dict, z: list[float], t: int) -> tuple[list[float], list[float]]:
    """Transition t+1 (t = 0..T-1): mean_i = a z_i + b z_{i+1 mod D} + c, var_i = v + w z_i²."""
    a, b, c, v, w = (coef[key][t] for key in "abcvw")
    return ([a * z[i] + b * z[(i + 1) % D] + c for i in range(D)],
            [v + w * z[i] ** 2 for i in range(D)])


class HandOperator(torch.nn.Module):
    """`ref_op` as the module `lower_bound` calls: op(z, t) -> (mean, variance)."""

    def __init__(self, coef: dict):
        super().__init__()
        self.coef = coef

    def forward(self, z, t):
        a, b, c, v, w = (self.coef[key][t] for key in "abcvw")
        flat = z.flatten(1)
        mean = a * flat + b * flat.roll(-1, 1) + c  # roll(-1)[:, i] = z_{i+1 mod D}
        return mean.view_as(z), (v + w * flat.square()).view_as(z)


def make_prior(dtype=torch.float32) -> inf.PixelGaussianPrior:
    prior = inf.PixelGaussianPrior(SHAPE).to(dtype)
    prior.mean.copy_(torch.tensor(M0, dtype=dtype).view(SHAPE))
    prior.std.copy_(torch.tensor(S0, dtype=dtype).view(SHAPE))
    return prior


def draws(seed: int, rows: int, steps: int, dtype) -> tuple[list, list]:
    """The implementation's draws, replayed from a generator seeded alike, in its order: the
    prior's normals, then per infusion step t = 1..T-1 the N(x, s²) normals, the model's
    normals and the Bernoulli uniforms (float32). Rows are k-major: row k·N + n."""
    g = torch.Generator().manual_seed(seed)
    e0 = torch.randn((rows, *SHAPE), generator=g, dtype=dtype).view(rows, D).tolist()
    steps_noise = [None]
    for _ in range(1, steps):
        e_inf = torch.randn((rows, *SHAPE), generator=g, dtype=dtype).view(rows, D).tolist()
        e_mod = torch.randn((rows, *SHAPE), generator=g, dtype=dtype).view(rows, D).tolist()
        u = torch.rand((rows, *SHAPE), generator=g).view(rows, D).tolist()
        steps_noise.append((e_inf, e_mod, u))
    return e0, steps_noise


def ref_bound(coef, x, alphas, k_samples, s, e0, noise) -> list[float]:
    steps, n_x = len(alphas), len(x)
    out = []
    for n in range(n_x):
        log_w = []
        for k in range(k_samples):
            r = k * n_x + n
            z = [M0[i] + S0[i] * e0[r][i] for i in range(D)]
            log_p = log_q = math.fsum(log_normal(z[i], M0[i], S0[i] ** 2) for i in range(D))
            for t in range(1, steps):
                mean, var = ref_op(coef, z, t - 1)
                alpha, (e_inf, e_mod, u) = alphas[t - 1], noise[t]
                z = [x[n][i] + s * e_inf[r][i] if u[r][i] < alpha
                     else mean[i] + math.sqrt(var[i]) * e_mod[r][i] for i in range(D)]
                for i in range(D):
                    lp = log_normal(z[i], mean[i], var[i])
                    mix = ([math.log(1 - alpha) + lp] if alpha < 1 else []) + \
                        ([math.log(alpha) + log_normal(z[i], x[n][i], s * s)] if alpha > 0 else [])
                    log_p, log_q = log_p + lp, log_q + log_sum_exp(mix)
            mean, var = ref_op(coef, z, steps - 1)
            log_p += math.fsum(log_normal(x[n][i], mean[i], var[i]) for i in range(D))
            log_w.append(log_p - log_q)
        out.append(log_sum_exp(log_w) - math.log(k_samples))
    return out


def coefs(steps: int, a=0.0, b=0.0, w=0.0) -> dict:
    return {"a": [a * (0.5 + 0.2 * t) for t in range(steps)], "b": [b] * steps,
            "c": [0.2 + 0.1 * t for t in range(steps)], "v": [0.04 / (1 + t) for t in range(steps)],
            "w": [w] * steps}


def pixels(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def bound(coef, x, alphas, k_samples, s, seed, dtype=torch.float32) -> torch.Tensor:
    return inf.lower_bound(HandOperator(coef), make_prior(dtype), x,
                           torch.tensor(alphas, dtype=torch.float64), k_samples, s,
                           generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("alphas", [(0.25, 0.5, 0.75), (0.0, 0.0, 0.0), (1.0, 0.25), (0.5, 1.0, 0.25)])
def test_bound_equals_the_reference_on_the_same_draws(alphas, dtype, tol):
    # alphas are exact in float32, so the reference's `u < α` is the implementation's test
    coef, n_x, k_samples, s = coefs(len(alphas), a=0.9, b=0.3, w=0.2), 4, 5, 0.2
    x = pixels(n_x, 0, dtype)
    got = bound(coef, x, alphas, k_samples, s, seed=3, dtype=dtype)
    e0, noise = draws(3, n_x * k_samples, len(alphas), dtype)
    expected = ref_bound(coef, x.view(n_x, D).tolist(), alphas, k_samples, s, e0, noise)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=tol,
                               atol=tol)


def test_without_infusion_an_input_free_operator_gives_the_exact_likelihood():
    # a = b = w = 0: p_T(x | z) = N(x; c_T, v_T) whatever z, and α = 0 makes q = p, so every
    # importance weight is p(x) and the bound is exact, for any draws and any K.
    coef, x = coefs(3), pixels(20, 1, torch.float64)
    exact = [math.fsum(log_normal(xi, coef["c"][-1], coef["v"][-1]) for xi in row)
             for row in x.view(20, D).tolist()]
    got = bound(coef, x, (0.0, 0.0, 0.0), 7, 0.1, seed=0, dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(exact, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)


def linear_gaussian_log_p(coef, x_row: list[float]) -> float:
    """b = w = 0: z_t = a_t z_{t-1} + c_t + N(0, v_t) per pixel, z_0 ~ N(m0, s0²), and
    x = a_T z_{T-1} + c_T + N(0, v_T). Sums of independent Gaussians, so per pixel
        x_i ~ N(M_T, S_T),  M_0 = m0_i, S_0 = s0_i²,  M_t = a_t M_{t-1} + c_t,
        S_t = a_t² S_{t-1} + v_t  (t = 1..T), and log p(x) = Σ_i log N(x_i; M_T, S_T)."""
    total = []
    for i in range(D):
        mean, var = M0[i], S0[i] ** 2
        for a, c, v in zip(coef["a"], coef["c"], coef["v"], strict=True):
            mean, var = a * mean + c, a * a * var + v
        total.append(log_normal(x_row[i], mean, var))
    return math.fsum(total)


LINEAR = coefs(3, a=0.9)
INFUSED = (0.25, 0.5, 0.75)


@pytest.mark.parametrize("alphas", [INFUSED, (0.0, 0.0, 0.0)])
def test_bound_is_below_the_closed_form_and_its_weights_are_unbiased(alphas):
    x = pixels(400, 2)
    exact = torch.tensor([linear_gaussian_log_p(LINEAR, row) for row in x.view(-1, D).tolist()],
                         dtype=torch.float64)
    gap = exact - bound(LINEAR, x, alphas, 4, 0.1, seed=5)
    # E[bound] <= log p(x) (Jensen); a margin of 4 standard errors tests the sign, not the seed
    assert gap.mean() > 4 * gap.std() / len(gap) ** 0.5
    # With K = 1 the bound is log w, w = p(x, z)/q(z | x), and E_q[w] = p(x): the mean of R
    # weights is p(x) within CLT error (w is bounded: p_t/q_t <= 1/(1-α_t) per pixel).
    x0 = torch.tensor([0.8, 0.9, 0.7]).view(1, *SHAPE)
    ratio = (bound(LINEAR, x0.repeat(100_000, 1, 1, 1), alphas, 1, 0.1, seed=6)
             - linear_gaussian_log_p(LINEAR, [0.8, 0.9, 0.7])).exp()
    assert abs(ratio.mean() - 1) < 4 * ratio.std() / len(ratio) ** 0.5


def test_more_importance_samples_raise_the_bound_on_average():
    x = pixels(300, 3)
    one, ten = (bound(LINEAR, x, INFUSED, k, 0.1, seed=k) for k in (1, 10))
    diff = ten - one  # E[L_10] >= E[L_1] (Burda et al. 2016), per image
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5
