"""Infusion training: estimators against direct formulas, chain statistics, training, CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from conftest import interrupt_trainer_at, one_line_error, same_weights, snapshot

from ssl_lab.checkpoint import find_checkpoint
from ssl_lab.cli import main
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion as inf
from ssl_lab.gen.infusion_config import load_infusion_config
from ssl_lab.gen.infusion_run import add_commands
from ssl_lab.gen.infusion_train import train_infusion
from ssl_lab.rundir import RunDir

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and the machine's other core is someone else's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(steps: int = 4, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    op = inf.MLPOperator(SHAPE, steps, hidden, layers=2)
    data = torch.rand(64, *SHAPE, generator=_gen(seed + 1))
    return op, inf.PixelGaussianPrior(SHAPE).fit(data), data


# ----------------------------------------------------------------------------- Parzen


def _parzen_direct(x: np.ndarray, centers: np.ndarray, sigma: float) -> np.ndarray:
    """log( 1/M Σ_j Π_d N(x_d; c_jd, σ²) ), no log-sum-exp tricks."""
    dens = np.exp(-((x[:, None, :] - centers[None]) ** 2) / (2 * sigma**2)) \
        / np.sqrt(2 * np.pi * sigma**2)
    return np.log(dens.prod(-1).mean(1))


def test_parzen_matches_direct_formula_batched():
    rng = np.random.default_rng(0)
    x, centers = rng.random((7, 3)), rng.random((11, 3))
    for sigma in (0.1, 0.3, 1.0):
        ours = inf.parzen_log_likelihood(torch.tensor(x), torch.tensor(centers), sigma,
                                         batch=3, center_batch=4).numpy()
        np.testing.assert_allclose(ours, _parzen_direct(x, centers, sigma), rtol=1e-10)
    grid = inf.parzen_log_likelihood(torch.tensor(x), torch.tensor(centers), [0.1, 1.0]).numpy()
    np.testing.assert_allclose(grid[1], _parzen_direct(x, centers, 1.0), rtol=1e-10)


def test_parzen_is_stable_where_the_direct_formula_underflows():
    x = torch.zeros(2, 100)
    centers = torch.ones(5, 100)  # every density underflows to 0 in float64
    ll = inf.parzen_log_likelihood(x, centers, 0.05)
    expected = -100 / (2 * 0.05**2) - 0.5 * 100 * math.log(2 * math.pi * 0.05**2)
    torch.testing.assert_close(ll, torch.full((2,), expected, dtype=torch.float64))


def test_choose_sigma_picks_the_best_on_validation():
    rng = torch.Generator().manual_seed(0)
    centers = torch.randn(200, 2, generator=rng) * 0.3
    val = torch.randn(100, 2, generator=rng) * 0.3
    sigma, scores = inf.choose_sigma(val, centers, [0.01, 0.1, 10.0])
    assert sigma == 0.1 and scores[0.1] == max(scores.values())


# ----------------------------------------------------------------------------- chain


def test_infusion_mask_rate_matches_alpha():
    for alpha in (0.0, 0.1, 0.5, 1.0):
        mask = inf.infusion_mask((200, 1000), alpha, torch.device("cpu"), _gen(1))
        assert abs(mask.float().mean().item() - alpha) < 0.005


def test_training_chain_infuses_at_rate_alpha_t():
    op, prior, _ = _model(steps=5)
    x = torch.rand(4000, *SHAPE, generator=_gen(3))  # continuous: a model draw never equals x
    alphas = inf.alpha_schedule(5, 0.1, 0.15)
    torch.testing.assert_close(alphas, torch.tensor([0.25, 0.4, 0.55, 0.7, 0.85],
                                                    dtype=torch.float64))
    chain = inf.training_chain(op, prior, x, alphas, _gen(4))
    assert len(chain.states) == 5 and len(chain.means) == 5
    for t in range(1, 5):
        rate = (chain.states[t] == x).float().mean().item()
        assert abs(rate - alphas[t - 1].item()) < 0.02, (t, rate)


def test_alpha_one_reproduces_the_target():
    op, prior, x = _model(steps=4)
    chain = inf.training_chain(op, prior, x, inf.alpha_schedule(4, 1.0, 0.0), _gen(0))
    for state in chain.states[1:]:
        assert torch.equal(state, x)
    assert not torch.equal(chain.states[0], x)  # z̃_0 is a prior draw


def test_no_gradient_flows_through_the_chain_states():
    op, prior, x = _model(steps=3)
    chain = inf.training_chain(op, prior, x, inf.alpha_schedule(3, 0.1, 0.1), _gen(0))
    assert all(not s.requires_grad for s in chain.states)
    assert all(m.requires_grad for m in chain.means)


def test_loss_weights():
    torch.testing.assert_close(inf.loss_weights(4), torch.tensor([.25, .5, .75, 1.],
                                                                 dtype=torch.float64))
    assert inf.loss_weights(3, "last").tolist() == [0, 0, 1]
    with pytest.raises(UserError):
        inf.loss_weights(3, "cosine")


def test_loss_falls_on_tiny_data():
    op, prior, x = _model(steps=4, hidden=64)
    opt = torch.optim.Adam(op.parameters(), lr=3e-3)
    alphas, weights = inf.alpha_schedule(4, 0.1, 0.1), inf.loss_weights(4)
    losses = []
    for step in range(30):
        loss, _ = inf.infusion_loss(inf.training_chain(op, prior, x, alphas, _gen(step)), x,
                                    weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5  # nats per 16-pixel image


def test_step_batchnorm_keeps_statistics_per_step():
    bn = inf.StepBatchNorm(3, steps=4, momentum=1.0)
    x = torch.randn(16, 3) * 2 + 5
    bn(x, 2)
    torch.testing.assert_close(bn.running_mean[2], x.mean(0))
    assert torch.equal(bn.running_mean[[0, 1, 3]], torch.zeros(3, 3))
    bn.eval()
    out = bn(x, 2)
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def test_conv_operator_shapes_and_variance_range():
    op = inf.build_operator("conv", (3, 8, 8), steps=3, hidden=8, layers=3)
    mean, var = op(torch.rand(5, 3, 8, 8), 1)
    assert mean.shape == var.shape == (5, 3, 8, 8)
    assert mean.min() >= 0 and mean.max() <= 1
    assert var.min() >= 1e-4 and var.max() <= 0.1 + 1e-4


# ------------------------------------------------------------------- prior, sampling, bound


def test_prior_is_the_per_pixel_gaussian_of_the_data():
    data = torch.rand(500, *SHAPE, generator=_gen(0))
    prior = inf.PixelGaussianPrior(SHAPE).fit(data, batch=64)
    np.testing.assert_allclose(prior.mean.numpy(), data.numpy().mean(0), atol=1e-6)
    np.testing.assert_allclose(prior.std.numpy(), data.numpy().std(0), atol=1e-6)
    x = data[:3]
    direct = -0.5 * (np.log(2 * np.pi * data.numpy().var(0)) + (x.numpy() - data.numpy().mean(0))
                     ** 2 / data.numpy().var(0)).reshape(3, -1).sum(1)
    np.testing.assert_allclose(prior.log_prob(x).numpy(), direct, rtol=1e-4)


def test_sampling_is_deterministic_under_a_seed():
    op, prior, _ = _model(steps=4)
    a, chain = inf.sample(op, prior, 6, 4, _gen(5), keep_chain=True)
    b, _ = inf.sample(op, prior, 6, 4, _gen(5))
    c, _ = inf.sample(op, prior, 6, 4, _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(chain) == 5 and torch.equal(chain[-1], a)
    assert op.training  # the caller's mode is restored


class _Constant(torch.nn.Module):
    """An operator that ignores its input: p(x) = N(x; m, v) exactly."""

    steps = 3

    def __init__(self, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        self.mean, self.var = mean, var

    def forward(self, z, t):
        return self.mean.expand_as(z), self.var.expand_as(z)


def test_lower_bound_exact_and_below_for_an_input_free_operator():
    m, v = torch.full(SHAPE, 0.4), torch.full(SHAPE, 0.05)
    op, prior = _Constant(m, v), inf.PixelGaussianPrior(SHAPE)
    x = torch.rand(50, *SHAPE, generator=_gen(0))
    exact = inf.gaussian_log_prob(x, m, v).flatten(1).sum(1).double()
    plain = inf.lower_bound(op, prior, x, torch.zeros(3, dtype=torch.float64), samples=3,
                            generator=_gen(1))
    torch.testing.assert_close(plain, exact)  # q = p: every importance weight is p_T(x)
    infused = inf.lower_bound(op, prior, x, inf.alpha_schedule(3, 0.2, 0.2), samples=64,
                              infusion_std=0.1, generator=_gen(2))
    gap = (exact - infused).mean().item()
    assert 0 < gap < 5.0  # below log p(x) on average (Jensen), and not absurdly loose


# ----------------------------------------------------------------------------- config and CLI


def test_config_rejects_unknown_keys_with_a_suggestion():
    with pytest.raises(UserError, match="infusion.steps"):
        load_infusion_config(None, ["infusion.step=3"])
    with pytest.raises(UserError, match="alpha0"):
        load_infusion_config(None, ["infusion.alpha0=1.5"])
    cfg = load_infusion_config(None, ["score.sigmas=[0.1,0.2]"])  # a YAML list, or
    assert cfg.score.sigma_grid() == [0.1, 0.2]
    cfg = load_infusion_config(None, ["score.bound_stds=0.02,0.05"])  # comma-separated
    assert cfg.score.bound_std_grid() == [0.02, 0.05]
    with pytest.raises(UserError, match="positive numbers"):
        load_infusion_config(None, ["score.sigmas=0.1,-2"])


def _tiny(run_dir, **extra) -> list[str]:
    base = {"run.dir": str(run_dir), "data.name": "digits", "data.fraction": 0.25,
            "infusion.steps": 3, "infusion.hidden": 32, "optim.batch_size": 64,
            "train.epochs": 3, "train.log_every_steps": 2, "train.monitor_n": 16,
            "score.parzen_samples": 200, "score.val_n": 50, "score.test_n": 60,
            "score.bound_n": 20, "score.bound_val_n": 10, "score.bound_samples": 3}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    ns.func(ns)


def test_cli_train_sample_score(tmp_path, capsys):
    run = tmp_path / "run"
    _cli(["infusion", "train", *_tiny(run)])
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "shape.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert any("val_bound" in r for r in records)
    _cli(["infusion", "sample", str(run), "n=4", "chains=2"])
    out = run / "samples" / "n4-chains2-seed0"
    assert (out / "samples.png").is_file() and (out / "chain.png").is_file()
    _cli(["infusion", "sample", str(run), "n=4", "chains=2", f"out={tmp_path / 'grids'}"])
    assert (tmp_path / "grids" / "chain.png").is_file()
    _cli(["infusion", "score", str(run)])
    report = json.loads((run / "score.json").read_text())
    assert math.isfinite(report["chain"]["parzen"]["test_ll"])
    assert math.isfinite(report["chain"]["bound"]["test_bound"])
    assert "Parzen LL" in capsys.readouterr().out
    with pytest.raises(UserError, match="already exists"):
        _cli(["infusion", "train", *_tiny(run)])
    with pytest.raises(UserError, match="score"):
        _cli(["infusion", "score", str(run), "infusion.steps=5"])


@pytest.mark.parametrize("args, message", [
    (["n=0"], "n must be >= 1"), (["n=-5"], "n must be >= 1"), (["chains=0"], "chains must be"),
    (["n=x"], "expects int"), (["chain=2"], "did you mean 'chains'"),
    (["n"], "not key=value")])
def test_sample_arguments_are_checked(tmp_path, capsys, args, message):
    assert main(["infusion", "sample", str(tmp_path), *args]) == 2
    assert message in one_line_error(capsys)


def test_sample_refuses_to_overwrite_an_explicit_out(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "samples.png").write_bytes(b"keep")
    assert main(["infusion", "sample", str(tmp_path), f"out={tmp_path / 'old'}"]) == 2
    assert "already exists" in one_line_error(capsys)
    assert (tmp_path / "old" / "samples.png").read_bytes() == b"keep"


def test_resume_replays_the_uninterrupted_run(tmp_path):
    """Crashed, then resumed with the short form `infusion train run.dir=X resume=true`: the
    saved config.yaml rebuilds the run, which ends bit-exact with the uninterrupted one."""
    full = train_infusion(load_infusion_config(None, _tiny(tmp_path / "a")))
    crash = tmp_path / "b"
    train_infusion(load_infusion_config(None, _tiny(crash, **{"train.ckpt_every_steps": 2})),
                   stop_at_step=3)
    assert not (crash / "summary.json").exists()
    assert main(["infusion", "train", f"run.dir={crash}", "resume=true"]) == 0
    assert json.loads((crash / "env.json").read_text())["resumed_at_step"] == 2
    assert same_weights(full, crash)


def test_ctrl_c_names_the_run_and_its_resume_command(tmp_path, monkeypatch, capsys):
    """As for `train` (tests/test_doc_flows.py): Ctrl-C during `infusion train` names the run
    directory, the checkpoint a resume starts from and the command, which finishes the run."""
    from ssl_lab.gen import infusion_train

    real_step = interrupt_trainer_at(monkeypatch, infusion_train.InfusionTrainer, 3)
    run = tmp_path / "run"
    assert main(["infusion", "train", *_tiny(run, **{"train.ckpt_every_steps": 2})]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"ssl-lab: interrupted; run directory {run}: "), err
    assert f"{run / 'checkpoints' / 'step-0000002'} (step 2)" in err, err
    command = err.split("`")[1]
    assert command == f"ssl-lab infusion train run.dir={run} resume=true"
    monkeypatch.setattr(infusion_train.InfusionTrainer, "train_step", real_step)
    assert main(command.split()[1:]) == 0
    assert json.loads((run / "env.json").read_text())["resumed_at_step"] == 2
    assert (run / "summary.json").is_file()


def test_more_epochs_on_resume_equal_a_longer_run(tmp_path):
    """train.epochs may be raised on resume (Adam's lr is constant): the result is the run
    that was that long from the start."""
    longer = train_infusion(load_infusion_config(None, _tiny(tmp_path / "a",
                                                             **{"train.epochs": 4})))
    short = train_infusion(load_infusion_config(None, _tiny(tmp_path / "b")))
    assert main(["infusion", "train", f"run.dir={short}", "resume=true", "train.epochs=4"]) == 0
    assert same_weights(longer, short)


def test_rejected_resume_and_second_writer_change_nothing(tmp_path, capsys):
    run = train_infusion(load_infusion_config(None, _tiny(tmp_path / "r",
                                                          **{"train.epochs": 1})))
    before = snapshot(run)
    capsys.readouterr()
    assert main(["infusion", "train", f"run.dir={run}", "resume=true", "infusion.steps=5"]) == 2
    assert "infusion.steps is 3" in one_line_error(capsys)
    assert main(["infusion", "train", f"run.dir={run}", "resume=true", "train.epochs=0"]) == 2
    assert "train.epochs" in one_line_error(capsys)
    with RunDir(run).lock():
        assert main(["infusion", "train", f"run.dir={run}", "resume=true"]) == 2
        assert "in use by pid" in one_line_error(capsys)
    assert snapshot(run) == before


def test_conv_operator_trains_end_to_end(tmp_path):
    run = train_infusion(load_infusion_config(None, _tiny(
        tmp_path / "conv", **{"infusion.operator": "conv", "infusion.hidden": 8,
                              "infusion.layers": 2, "train.epochs": 1})))
    assert find_checkpoint(run) is not None
    assert json.loads((run / "summary.json").read_text())["steps"] > 0


def test_training_from_a_packed_store_equals_training_from_its_source(tmp_path):
    """`data.name=packed:DEST` (read into memory: the chain trains on every image each epoch)
    gives the same weights as the source it was packed from."""
    from ssl_lab.data.pack import pack

    store, _ = pack("digits", tmp_path / "store", progress=False)
    runs = [train_infusion(load_infusion_config(None, _tiny(tmp_path / name, **{"data.name": data})))
            for name, data in (("src", "digits"), ("packed", f"packed:{store}"))]
    assert same_weights(*runs)
