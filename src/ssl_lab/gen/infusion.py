"""Infusion training (Bordes, Honari, Vincent; ICLR 2017): a generative Markov chain learnt by
"infusing" the target into the chain that produces its training inputs.

Notation (as in the paper, arXiv 1703.06975). The generative chain draws z_0 ~ p_0 (a per-pixel
Gaussian fitted to the training set), then z_t ~ p_t(z_t | z_{t-1}) for t = 1..T, where p_t is a
factorised Gaussian whose mean and variance a *transition operator* computes from z_{t-1} and
the step index t.
The *training* (infusion) chain starts the same way, but each of its states z̃_t (t < T) takes,
per pixel, the target x_i with probability α_t = α_0 + ω·t and a draw of p_t otherwise. The
loss is Σ_t w_t · (−log p_t(x | z̃_{t-1})) with w_t = t/T (the authors' code), and no gradient
flows through the chain's states (they are samples; the paper treats them as fixed inputs).

Everything here is a pure function of tensors and a `torch.Generator`, shape (N, C, H, W) with
pixels in [0, 1], device-agnostic. Config, training, sampling/scoring and the command line are
in `infusion_config.py`, `infusion_train.py`, `infusion_eval.py` and `infusion_run.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- schedules


def alpha_schedule(steps: int, alpha0: float, omega: float) -> Tensor:
    """α_t = min(1, α_0 + ω·t) for t = 1..T (float64, shape (T,)); α_T is never used to infuse
    (the last transition only scores x) but is kept so the index is t − 1 everywhere."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    return (alpha0 + omega * t).clamp(0.0, 1.0)


def loss_weights(steps: int, kind: str = "linear") -> Tensor:
    """w_t for t = 1..T: "linear" = t/T (authors' code: late steps, which see more of x and
    must get the details right, count more), "uniform" = 1, "last" = only the final step."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    if kind == "linear":
        return t / steps
    if kind == "uniform":
        return torch.ones_like(t)
    if kind == "last":
        return (t == steps).double()
    raise UserError(f"infusion.weighting must be linear, uniform or last, got {short(kind)}")


# ----------------------------------------------------------------------------- densities


def gaussian_log_prob(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Per-element log N(x; mean, var) in nats."""
    return -0.5 * (LOG_2PI + var.log() + (x - mean).square() / var)


def _per_example(values: Tensor) -> Tensor:
    return values.flatten(1).sum(1)


class PixelGaussianPrior(nn.Module):
    """p_0: an independent Gaussian per pixel with the training set's mean and std.

    Pixels that never vary (e.g. image borders) would get std 0 and infinite density: the std is
    floored at `std_min` (0.01 = the operator's smallest variance, 1e-4, as a std), so the prior
    and the operator are capped alike.
    """

    def __init__(self, shape: tuple[int, int, int], std_min: float = 0.01) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full(shape, 0.5))
        self.register_buffer("std", torch.full(shape, 0.5))
        self.std_min = std_min

    @torch.no_grad()
    def fit(self, images: Tensor, batch: int = 4096) -> PixelGaussianPrior:
        """Fit to images (N, C, H, W) in [0, 1]; in float64 chunks (sums of 60k squares)."""
        total = torch.zeros(self.mean.shape, dtype=torch.float64, device=images.device)
        squares = torch.zeros_like(total)
        for chunk in images.split(batch):
            chunk = chunk.double()
            total += chunk.sum(0)
            squares += chunk.square().sum(0)
        n = images.shape[0]
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0.0)
        self.mean.copy_(mean)
        self.std.copy_(var.sqrt().clamp_min(self.std_min))
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn((n, *self.mean.shape), generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p_0(x) per example (N,)."""
        return _per_example(gaussian_log_prob(x, self.mean, self.std.square()))


# ----------------------------------------------------------------------------- the operator


class StepBatchNorm(nn.Module):
    """Batch norm with one set of running statistics per chain step, a shared affine.

    The inputs of step 1 (prior samples) and step T (nearly clean images) have very different
    statistics; a single running average would mix them and make eval-mode sampling drift, so
    (as in the paper) each step t keeps its own running mean/var, while γ, β are shared: the
    step is told to the network only through these statistics.
    Works for (N, F) and (N, C, H, W) inputs.
    """

    def __init__(self, features: int, steps: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(steps, features))
        self.register_buffer("running_var", torch.ones(steps, features))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: Tensor, t: int) -> Tensor:
        # running_mean[t] is a contiguous view: batch_norm updates the step's row in place.
        return F.batch_norm(x, self.running_mean[t], self.running_var[t], self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class _GaussianHead(nn.Module):
    """Maps pre-activations to the authors' output parametrisation: mean = sigmoid (pixels live
    in [0, 1]), variance = sigmoid · var_scale + var_min (bounded: no collapse to a spike)."""

    def __init__(self, var_scale: float, var_min: float) -> None:
        super().__init__()
        self.var_scale, self.var_min = var_scale, var_min

    def forward(self, raw_mean: Tensor, raw_var: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(raw_mean), torch.sigmoid(raw_var) * self.var_scale + self.var_min


class MLPOperator(nn.Module):
    """The paper's MNIST operator: flattened pixels → `layers` × (Linear, step-BN, ReLU) →
    per-pixel Gaussian mean and variance."""

    def __init__(self, shape: tuple[int, int, int], steps: int, hidden: int = 1200,
                 layers: int = 2, var_scale: float = 0.1, var_min: float = 1e-4) -> None:
        super().__init__()
        self.shape, self.steps = tuple(shape), steps
        dim = math.prod(shape)
        widths = [dim] + [hidden] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=False)  # BN's shift is the bias
                                     for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.norms = nn.ModuleList(StepBatchNorm(hidden, steps) for _ in range(layers))
        self.out = nn.Linear(widths[-1], 2 * dim)
        self.head = _GaussianHead(var_scale, var_min)

    def forward(self, z: Tensor, t: int) -> tuple[Tensor, Tensor]:
        h = z.flatten(1)
        for linear, norm in zip(self.linears, self.norms, strict=True):
            h = F.relu(norm(linear(h), t))
        raw_mean, raw_var = self.out(h).view(-1, 2, *self.shape).unbind(1)
        return self.head(raw_mean, raw_var)


class ConvOperator(nn.Module):
    """A small convolutional operator for RGB (or any) images: 3×3 convolutions with dilation
    1, 2, 4, … (the receptive field doubles per layer at no extra cost), step-BN, ReLU, then a
    1×1 convolution to per-pixel mean and variance."""

    def __init__(self, shape: tuple[int, int, int], steps: int, hidden: int = 64,
                 layers: int = 4, var_scale: float = 0.1, var_min: float = 1e-4) -> None:
        super().__init__()
        self.shape, self.steps = tuple(shape), steps
        chans = [shape[0]] + [hidden] * layers
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, padding=2 ** i, dilation=2 ** i, bias=False)
            for i, (a, b) in enumerate(zip(chans[:-1], chans[1:], strict=True)))
        self.norms = nn.ModuleList(StepBatchNorm(hidden, steps) for _ in range(layers))
        self.out = nn.Conv2d(chans[-1], 2 * shape[0], 1)
        self.head = _GaussianHead(var_scale, var_min)

    def forward(self, z: Tensor, t: int) -> tuple[Tensor, Tensor]:
        h = z
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.relu(norm(conv(h), t))
        raw_mean, raw_var = self.out(h).chunk(2, dim=1)
        return self.head(raw_mean, raw_var)


def build_operator(kind: str, shape: tuple[int, int, int], steps: int, hidden: int,
                   layers: int, var_scale: float = 0.1, var_min: float = 1e-4) -> nn.Module:
    if kind == "mlp":
        return MLPOperator(shape, steps, hidden, layers, var_scale, var_min)
    if kind == "conv":
        return ConvOperator(shape, steps, hidden, layers, var_scale, var_min)
    raise UserError(f"infusion.operator must be mlp or conv, got {short(kind)}")


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (per-step running BN statistics) and no autograd; restores the mode after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


# ----------------------------------------------------------------------------- training chain


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def infusion_mask(shape: torch.Size | tuple[int, ...], alpha: float, device: torch.device,
                  generator: torch.Generator | None = None) -> Tensor:
    """Per-pixel Bernoulli(α) mask: True where the target is infused."""
    return torch.rand(shape, generator=generator, device=device) < alpha


def infuse(x: Tensor, proposal: Tensor, alpha: float,
           generator: torch.Generator | None = None) -> Tensor:
    """z̃ = x where a Bernoulli(α) mask fires, the model's proposal elsewhere."""
    return torch.where(infusion_mask(x.shape, alpha, x.device, generator), x, proposal)


@dataclass
class ChainOutput:
    states: list[Tensor]  # z̃_0 … z̃_{T-1}: the inputs of the T transitions (no grad)
    means: list[Tensor]  # mean of p_t(· | z̃_{t-1}), t = 1..T (with grad)
    variances: list[Tensor]


def training_chain(op: nn.Module, prior: PixelGaussianPrior, x: Tensor, alphas: Tensor,
                   generator: torch.Generator | None = None) -> ChainOutput:
    """Run the infusion chain on a batch x; the operator's mode (train/eval) is the caller's."""
    steps = len(alphas)
    z = prior.sample(x.shape[0], generator)
    out = ChainOutput([z], [], [])
    for t in range(1, steps + 1):
        mean, var = op(z, t - 1)
        out.means.append(mean)
        out.variances.append(var)
        if t < steps:
            with torch.no_grad():  # stop-gradient: the next state is a sample, a fixed input
                proposal = mean + var.sqrt() * _randn_like(mean, generator)
                z = infuse(x, proposal, float(alphas[t - 1]), generator)
            out.states.append(z)
    return out


def infusion_loss(chain: ChainOutput, x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_t w_t NLL_t / Σ_t w_t, NLL_t per step (T,)), NLL_t = −log p_t(x | z̃_{t-1}) in nats per
    image. Dividing by Σ w keeps the loss scale (and a good lr) independent of T."""
    nll = torch.stack([-_per_example(gaussian_log_prob(x, m, v)).mean()
                       for m, v in zip(chain.means, chain.variances, strict=True)])
    w = weights.to(nll.device, nll.dtype)
    return (w * nll).sum() / w.sum(), nll.detach()


# ----------------------------------------------------------------------------- sampling


def sample(op: nn.Module, prior: PixelGaussianPrior, n: int, steps: int,
           generator: torch.Generator | None = None, keep_chain: bool = False,
           final_noise: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Run the generative chain from the prior; returns (x̂ (n, C, H, W), states).

    x̂ is the *mean* of the last transition, p_T(· | z_{T-1}) (as is usual for such chains:
    its variance is pixel noise, not content); `final_noise=True` returns a draw instead.
    `states` (when `keep_chain`) is [z_0, z_1, …, z_{T-1}, x̂]. Deterministic given `generator`.
    """
    with evaluating(op):
        z = prior.sample(n, generator)
        states = [z] if keep_chain else []
        for t in range(1, steps + 1):
            mean, var = op(z, min(t, op.steps) - 1)  # longer test chains reuse the last step's BN
            noisy = t < steps or final_noise
            z = mean + var.sqrt() * _randn_like(mean, generator) if noisy else mean
            if keep_chain:
                states.append(z)
    return z, states


# ----------------------------------------------------------------------------- lower bound


def _log_q_and_p(z: Tensor, x: Tensor, mean: Tensor, var: Tensor, alpha: float,
                 infusion_var: float) -> tuple[Tensor, Tensor]:
    """Per-example log q_t(z | ·, x) and log p_t(z | ·) for the smoothed infusion proposal."""
    log_p = gaussian_log_prob(z, mean, var)
    log_infused = gaussian_log_prob(z, x, torch.full_like(x, infusion_var))
    # log[(1-α) p + α N(x, s²)] per pixel, exact at α ∈ {0, 1} (a -inf term drops out)
    never = torch.full_like(z, -math.inf)
    log_q = torch.logaddexp(log_p + math.log1p(-alpha) if alpha < 1 else never,
                            log_infused + math.log(alpha) if alpha > 0 else never)
    return _per_example(log_q), _per_example(log_p)


def _log_weights(op: nn.Module, prior: PixelGaussianPrior, x: Tensor, alphas: Tensor,
                 infusion_std: float, generator: torch.Generator | None) -> Tensor:
    """log p(x, z_{0..T-1}) − log q(z_{0..T-1} | x) for one trajectory per row of x."""
    steps = len(alphas)
    z = prior.sample(x.shape[0], generator)  # q_0 = p_0: the prior terms cancel
    log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for t in range(1, steps):
        mean, var = op(z, t - 1)
        alpha = float(alphas[t - 1])
        infused = x + infusion_std * _randn_like(x, generator)
        proposal = mean + var.sqrt() * _randn_like(mean, generator)
        z = torch.where(infusion_mask(x.shape, alpha, x.device, generator), infused, proposal)
        log_q, log_p = _log_q_and_p(z, x, mean, var, alpha, infusion_std ** 2)
        log_w += (log_p - log_q).double()
    mean, var = op(z, steps - 1)
    return log_w + _per_example(gaussian_log_prob(x, mean, var)).double()


def lower_bound(op: nn.Module, prior: PixelGaussianPrior, x: Tensor, alphas: Tensor,
                samples: int = 10, infusion_std: float = 0.05, batch: int = 2048,
                generator: torch.Generator | None = None) -> Tensor:
    """Importance-sampled stochastic lower bound on log p(x) in nats, per example (N,).

    The generative model's marginal is p(x) = E_{z ~ p}[p_T(x | z_{T-1})] over trajectories
    z = (z_0 … z_{T-1}). The proposal q(z | x) is the infusion chain with the Dirac at x_i
    replaced by N(x_i, s²), s = `infusion_std` (a Dirac has no density, so p/q would be 0 on
    every infused pixel):
        q_t(z_t,i | z_{t-1}, x) = (1 − α_t) p_t(z_t,i | z_{t-1}) + α_t N(z_t,i; x_i, s²).
    With K = `samples` trajectories z^k ~ q, log (1/K) Σ_k p(x, z^k) / q(z^k | x) has expectation
    ≤ log p(x) (Jensen), and tends to it as K grows (Burda et al. 2016). With all α = 0, q = p and
    this is plain Monte-Carlo over the model's own chains.
    """
    if samples < 1:
        raise UserError(f"the lower bound needs samples >= 1, got {samples}")
    rows = max(1, batch // samples)
    out = []
    with evaluating(op):
        for chunk in x.split(rows):
            repeated = chunk.repeat(samples, *([1] * (chunk.dim() - 1)))  # (K·B, …), k-major
            log_w = _log_weights(op, prior, repeated, alphas, infusion_std, generator)
            out.append(torch.logsumexp(log_w.view(samples, -1), 0) - math.log(samples))
    return torch.cat(out)


# ----------------------------------------------------------------------------- Parzen windows


def parzen_log_likelihood(x: Tensor, centers: Tensor, sigma: float | Sequence[float],
                          batch: int = 512, center_batch: int = 4096,
                          dtype: torch.dtype = torch.float64) -> Tensor:
    """Gaussian Parzen-window log-density of each row of x (N, D) under centers (M, D), in nats:

        log p̂(x) = logsumexp_j(−‖x − c_j‖² / 2σ²) − log M − (D/2) log(2πσ²).

    Batched over both x and centers (memory O(batch · center_batch)), with a logsumexp across
    center chunks; float64 by default, where the ‖x‖² + ‖c‖² − 2x·c expansion loses nothing
    that matters at σ ≈ 0.1. A list of σ reuses the distances: returns (len(sigma), N).
    """
    sigmas = torch.tensor([sigma] if isinstance(sigma, (int, float)) else list(sigma),
                          dtype=dtype, device=x.device)
    x, centers = x.flatten(1).to(dtype), centers.flatten(1).to(dtype)
    m, d = centers.shape
    norm = -math.log(m) - 0.5 * d * torch.log(2 * math.pi * sigmas.square())
    scale = (-0.5 / sigmas.square())[:, None, None]  # (S, 1, 1)
    c_sq = centers.square().sum(1)
    out = []
    for xb in x.split(batch):
        x_sq = xb.square().sum(1, keepdim=True)
        parts = []
        for cb, cb_sq in zip(centers.split(center_batch), c_sq.split(center_batch), strict=True):
            dist = (x_sq + cb_sq - 2 * xb @ cb.T).clamp_min(0.0)  # (B, Mc)
            parts.append(torch.logsumexp(scale * dist, dim=2))  # (S, B)
        out.append(torch.logsumexp(torch.stack(parts, 2), dim=2) + norm[:, None])
    result = torch.cat(out, 1)
    return result[0] if isinstance(sigma, (int, float)) else result


def choose_sigma(val: Tensor, centers: Tensor, sigmas: Sequence[float],
                 **kwargs) -> tuple[float, dict[float, float]]:
    """The σ of `sigmas` with the highest mean validation log-likelihood, and every σ's value."""
    means = parzen_log_likelihood(val, centers, list(sigmas), **kwargs).mean(1)
    scores = {float(s): float(v) for s, v in zip(sigmas, means, strict=True)}
    return max(scores, key=scores.get), scores


def default_sigmas() -> list[float]:
    """A log grid 0.05 … 1 (GAN-era MNIST Parzen σ are ≈ 0.1–0.2)."""
    return [round(float(s), 4) for s in torch.logspace(math.log10(0.05), 0.0, 14)]
