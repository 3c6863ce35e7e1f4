"""RCDM: a tiny diffusers UNet learns, samples are seeded, h matters, retrieval is right."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import one_line_error, same_weights, snapshot

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
    from ssl_lab.train_loop import train

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
    """A crashed run resumed with the short form `rcdm train run.dir=X resume=true` (the saved
    config.yaml rebuilds it, ENCODER_RUN left out) ends bit-exact with the uninterrupted one."""
    from ssl_lab.cli import main
    from ssl_lab.gen.rcdm_config import SampleArgs, ScoreArgs, load_train_config
    from ssl_lab.gen.rcdm_sample import sample_command
    from ssl_lab.gen.rcdm_score import score_command
    from ssl_lab.gen.rcdm_train import train_rcdm

    full = train_rcdm(load_train_config(str(encoder_run), [f"run.dir={tmp_path / 'a'}", *TINY]))
    crashed = load_train_config(str(encoder_run), [f"run.dir={tmp_path / 'b'}", *TINY])
    train_rcdm(crashed, stop_at_step=4)
    assert not (tmp_path / "b" / "summary.json").exists()
    assert main(["rcdm", "train", f"run.dir={tmp_path / 'b'}", "resume=true"]) == 0
    resumed = tmp_path / "b"
    # Noise, timesteps and data order are functions of (seed, step): resuming is bit-exact.
    assert same_weights(full, resumed)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == json.loads((resumed / "summary.json").read_text())["steps"]
    env = json.loads((resumed / "env.json").read_text())
    assert env["resumed_at_step"] == 3 and env["precision"] in ("bfloat16", "float32")
    assert not env["grad_scaler"]

    paths = sample_command(full, SampleArgs(n=3, k=2, interp=3))
    assert all(p.is_file() for p in paths.values())
    arrays = np.load(paths["arrays"])
    assert arrays["samples"].shape == (3, 2, 8, 8, 1) and arrays["interp"].shape == (2, 3, 8, 8, 1)

    report = score_command(full, ScoreArgs(n=6, k=2))
    assert report["retrieval"]["n"] == 6 and report["retrieval"]["queries"] == 12
    assert 1 <= report["retrieval"]["mean_rank"] <= 6
    assert (full / "score.json").is_file()


def test_rejected_resume_and_second_writer_change_nothing(encoder_run, tmp_path, capsys):
    """A conflicting key, another encoder, or a run directory in use by another writer: exit 2
    with one line, and every file of the run stays as it was."""
    from ssl_lab.cli import main
    from ssl_lab.rundir import RunDir

    run = tmp_path / "r"
    assert main(["rcdm", "train", str(encoder_run), f"run.dir={run}", *TINY,
                 "train.epochs=1"]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["rcdm", "train", f"run.dir={run}", "resume=true", "unet.size=32"]) == 2
    assert "unet.size is 16" in one_line_error(capsys)
    assert main(["rcdm", "train", str(tmp_path), f"run.dir={run}", "resume=true"]) == 2
    assert "trained on encoder" in one_line_error(capsys)
    assert main(["rcdm", "train", str(encoder_run), f"run.dir={run}"]) == 2  # no resume=true
    assert "already exists" in one_line_error(capsys)
    with RunDir(run).lock():
        assert main(["rcdm", "train", f"run.dir={run}", "resume=true"]) == 2
        assert "in use by pid" in one_line_error(capsys)
    assert snapshot(run) == before
    # the keys documented as safe may change: the same encoder given again is accepted too
    assert main(["rcdm", "train", str(encoder_run), f"run.dir={run}", "resume=true",
                 "train.budget_s=600", "sample.k=2"]) == 0


def test_fp16_uses_a_grad_scaler_and_resumes_exactly(encoder_run, tmp_path):
    """train.precision=fp16 (autocast works on CPU too): loss scaling with a GradScaler whose
    state is checkpointed and restored, so a resumed fp16 run is bit-exact as well."""
    from ssl_lab import checkpoint as ckpt_io
    from ssl_lab.cli import main
    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    fp16 = [*TINY, "train.precision=fp16", "train.epochs=1", "train.ckpt_every_steps=2"]
    full = train_rcdm(load_train_config(str(encoder_run), [f"run.dir={tmp_path / 'a'}", *fp16]))
    env = json.loads((full / "env.json").read_text())
    assert env["precision"] == "float16" and env["grad_scaler"] is True
    state = ckpt_io.load_state(ckpt_io.find_checkpoint(full))
    assert state["scaler"]["scale"] > 0
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all("grad_scale" in r for r in records)
    train_rcdm(load_train_config(str(encoder_run), [f"run.dir={tmp_path / 'b'}", *fp16]),
               stop_at_step=3)
    assert main(["rcdm", "train", f"run.dir={tmp_path / 'b'}", "resume=true"]) == 0
    assert same_weights(full, tmp_path / "b")


@pytest.mark.parametrize("args, message", [
    (["k=0"], "k must be >= 1"), (["n=0"], "n must be >= 1"), (["n=-5"], "n must be >= 1"),
    (["steps=0"], "steps must be >= 1"), (["steps=2000"], "steps must be <= 1000"),
    (["interp=1"], "interp must be 0"), (["eta=-1"], "eta must be >= 0"),
    (["split=dev"], "split must be"), (["images=a.png", "n=3"], "exclude each other"),
    (["kk=2"], "did you mean 'k'"), (["k"], "not key=value")])
def test_sample_arguments_are_checked(tmp_path, capsys, args, message):
    from ssl_lab.cli import main

    assert main(["rcdm", "sample", str(tmp_path), *args]) == 2
    assert message in one_line_error(capsys)


def test_sample_and_score_refuse_before_loading(tmp_path, capsys):
    from ssl_lab.cli import main

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "grid.png").write_bytes(b"keep")
    assert main(["rcdm", "sample", str(tmp_path), f"out={tmp_path / 'old'}"]) == 2
    assert "already exists" in one_line_error(capsys)
    assert (tmp_path / "old" / "grid.png").read_bytes() == b"keep"
    assert main(["rcdm", "score", str(tmp_path), "n=1"]) == 2
    assert "n must be >= 2" in one_line_error(capsys)
    assert main(["rcdm", "sample", str(tmp_path), "k=2"]) == 2
    assert "not an RCDM run" in one_line_error(capsys)
    assert main(["rcdm", "score", str(tmp_path / "missing"), "n=10"]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_bad_layer_and_key_are_user_errors(encoder_run, tmp_path):
    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    assert load_train_config(str(encoder_run), ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 str
    with pytest.raises(UserError, match="unknown config key 'unet.chanels'"):
        load_train_config(str(encoder_run), ["unet.chanels=8"])
    with pytest.raises(UserError, match="not a layer"):
        train_rcdm(load_train_config(str(encoder_run), [f"run.dir={tmp_path / 'x'}",
                                                        "layer=stage9"]))
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="does not exist"):
        train_rcdm(load_train_config(str(tmp_path / "nope"), []))
    with pytest.raises(UserError, match="ENCODER_RUN"):  # neither given nor saved
        train_rcdm(load_train_config(None, []))
    with pytest.raises(UserError, match="once"):
        load_train_config(str(encoder_run), [f"encoder={encoder_run}"])
