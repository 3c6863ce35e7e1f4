"""RCDM: a tiny diffusers UNet learns, samples are seeded, h matters, retrieval is right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from ssl_lab.errors import UserError  # noqa: E402
from ssl_lab.gen import rcdm  # noqa: E402

SHAPE = (1, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core machine the
    threads' spin-waiting made these tests 10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(feature_dim: int = 8, seed: int = 0) -> rcdm.RCDM:
    torch.manual_seed(seed)
    return rcdm.RCDM(rcdm.build_unet(16, 1, (16, 32), layers_per_block=1), feature_dim)


def toy_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares at n positions on black (as uint8 NHWC) and their positions as h."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 8, (n, 2), generator=gen)
    images = torch.zeros(n, 12, 12, 1, dtype=torch.uint8)
    for i, (r, c) in enumerate(pos.tolist()):
        images[i, r:r + 4, c:c + 4] = 255
    h = torch.cat([pos.float(), torch.randn(n, 6, generator=gen)], 1)
    return images, h


def fixed_loss(model, sched, x0, h) -> float:
    with torch.no_grad():
        return rcdm.diffusion_loss(model, sched, x0, h, torch.Generator().manual_seed(123)).item()


def test_canvas_pads_and_round_trips():
    images, _ = toy_batch(4)
    x = rcdm.to_canvas(images, content=12, size=16)
    assert x.shape == (4, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., :, -2:] == -1)  # black border
    assert torch.equal(rcdm.from_canvas(x, 12), images)  # the centre crop is the image, exactly


def test_unet_size_must_fit_levels():
    with pytest.raises(UserError, match="multiple of 2"):
        rcdm.build_unet(30, 1, (16, 32, 32))


def test_tiny_unet_loss_falls():
    images, h = toy_batch()
    model = tiny_model()
    model.set_feature_stats(h)
    sched = rcdm.train_scheduler()
    x0 = rcdm.to_canvas(images, 12, 16)
    before = fixed_loss(model, sched, x0, h)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        rcdm.diffusion_loss(model, sched, x0, h, gen).backward()
        opt.step()
        opt.zero_grad()
    after = fixed_loss(model, sched, x0, h)
    assert after < 0.6 * before, (before, after)


def test_sampling_is_deterministic_under_a_seed():
    model = tiny_model()
    h = torch.randn(2, 8)
    for eta in (0.0, 1.0):  # η > 0 draws fresh noise at every step: it must come from the seed
        a = rcdm.sample_k(model, h, 2, SHAPE, steps=4, seed=7, eta=eta)
        b = rcdm.sample_k(model, h, 2, SHAPE, steps=4, seed=7, eta=eta)
        c = rcdm.sample_k(model, h, 2, SHAPE, steps=4, seed=8, eta=eta)
        assert a.shape == (2, 2, *SHAPE)
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_conditioning_changes_samples():
    model = tiny_model()
    noise = rcdm.start_noise(2, 1, SHAPE, seed=0)  # the same start noise for both
    h = torch.stack([torch.full((8,), -2.0), torch.full((8,), 2.0)])
    out = rcdm.ddim_sample(model, h, noise, steps=4)
    assert (out[0] - out[1]).abs().mean() > 1e-3
    same = rcdm.ddim_sample(model, h[:1].repeat(2, 1), noise, steps=4)
    assert torch.equal(same[0], same[1])
    torch.nn.init.zeros_(model.cond.weight)  # cut the only path from h: outputs must agree
    torch.nn.init.zeros_(model.cond.bias)
    cut = rcdm.ddim_sample(model, h, noise, steps=4)
    assert torch.allclose(cut[0], cut[1])


def test_interpolation_grid_shape_and_endpoints():
    model = tiny_model()
    h = torch.randn(2, 8)
    grid = rcdm.interpolate(model, h[0], h[1], points=3, k=2, shape=SHAPE, steps=3, seed=0)
    assert grid.shape == (2, 3, *SHAPE)
    # α = 0 with noise j is exactly what sampling from h_a with the same seed gives.
    ends = rcdm.sample_k(model, h[:1], 2, SHAPE, steps=3, seed=0)
    assert torch.allclose(grid[:, 0], ends[0], atol=1e-5)


def test_retrieval_perfect_random_and_collapsed():
    gen = torch.Generator().manual_seed(0)
    n = 200
    gallery = torch.randn(n, 32, generator=gen)
    target = torch.arange(n).repeat_interleave(3)
    perfect = rcdm.retrieval_ranks(gallery[target], gallery, target)
    assert torch.all(perfect == 1)
    rep = rcdm.retrieval_report(perfect, n)
    assert rep["mean_rank"] == 1 and rep["top1"] == 1 and rep["chance_mean_rank"] == 100.5
    noisy = rcdm.retrieval_ranks(torch.randn(len(target), 32, generator=gen), gallery, target)
    assert abs(noisy.mean().item() - (n + 1) / 2) < 0.1 * n
    collapsed = rcdm.retrieval_ranks(torch.ones(6, 4), torch.ones(n, 4), target[:6])
    assert torch.allclose(collapsed, torch.full((6,), (n + 1) / 2))  # ties: chance, not rank 1


def test_diversity():
    same = torch.full((3, 4, 5, 5, 1), 100, dtype=torch.uint8)
    assert torch.all(rcdm.diversity(same) == 0)
    alt = torch.zeros(1, 2, 5, 5, 1, dtype=torch.uint8)
    alt[:, 1] = 255
    assert rcdm.diversity(alt).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    from conftest import tiny_run_overrides

    from ssl_lab.config import load_config
    from ssl_lab.train import train

    run = tmp_path_factory.mktemp("enc") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the per-test one-thread fixture
    try:
        train(load_config(None, tiny_run_overrides(run, **{"train.epochs": 1,
                                                           "eval.enabled": False})))
    finally:
        torch.set_num_threads(before)
    return run


TINY = ["unet.size=16", "unet.channels=16-32", "data.fraction=0.1", "train.batch_size=32",
        "train.epochs=2", "train.preview=false", "train.ckpt_every_steps=3", "sample.steps=3"]


def test_train_resume_sample_score(encoder_run, tmp_path):
    from ssl_lab import checkpoint as ckpt_io
    from ssl_lab.gen.rcdm_run import (
        SampleArgs,
        ScoreArgs,
        sample_command,
        score_command,
        train_config,
        train_rcdm,
    )

    full = train_rcdm(train_config(str(encoder_run), [f"run.dir={tmp_path / 'a'}", *TINY]))
    crashed = train_config(str(encoder_run), [f"run.dir={tmp_path / 'b'}", *TINY])
    train_rcdm(crashed, stop_at_step=4)
    resumed = train_rcdm(train_config("", [f"run.dir={tmp_path / 'b'}", "resume=true"]))
    # Noise, timesteps and data order are functions of (seed, step): resuming is bit-exact.
    weights = [load_file(str(ckpt_io.find_checkpoint(r) / ckpt_io.WEIGHTS))
               for r in (full, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == json.loads((resumed / "summary.json").read_text())["steps"]

    paths = sample_command(full, SampleArgs(n=3, k=2, interp=3))
    assert all(p.is_file() for p in paths.values())
    arrays = np.load(paths["arrays"])
    assert arrays["samples"].shape == (3, 2, 8, 8, 1) and arrays["interp"].shape == (2, 3, 8, 8, 1)

    report = score_command(full, ScoreArgs(n=6, k=2))
    assert report["retrieval"]["n"] == 6 and report["retrieval"]["queries"] == 12
    assert 1 <= report["retrieval"]["mean_rank"] <= 6
    assert (full / "score.json").is_file()


def test_bad_layer_and_key_are_user_errors(encoder_run, tmp_path):
    from ssl_lab.gen.rcdm_run import train_config, train_rcdm

    assert train_config(str(encoder_run), ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 str
    with pytest.raises(UserError, match="unknown config key 'unet.chanels'"):
        train_config(str(encoder_run), ["unet.chanels=8"])
    with pytest.raises(UserError, match="not a layer"):
        train_rcdm(train_config(str(encoder_run), [f"run.dir={tmp_path / 'x'}", "layer=stage9"]))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="does not exist"):
        train_rcdm(train_config(str(tmp_path / "nope"), []))


def test_add_commands_wires_argparse(tmp_path):
    import argparse

    from ssl_lab.gen.rcdm import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["rcdm", "score", str(tmp_path / "missing"), "n=10"])
    assert ns.overrides == ["n=10"]
    with pytest.raises(UserError, match="does not exist"):
        ns.func(ns)
    ns = parser.parse_args(["rcdm", "sample", str(tmp_path), "k=2"])
    with pytest.raises(UserError, match="not an RCDM run"):
        ns.func(ns)
