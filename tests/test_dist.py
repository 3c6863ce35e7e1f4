"""ssl_lab.dist: 2 gloo processes on CPU, the model inside torch's DDP as in training, reproduce
one process with the global batch exactly (loss, every gradient, BatchNorm running stats) for
every method; helpers alone are no-ops.

One spawn runs every distributed case (starting processes is the slow part); each test then
compares one case's saved results with a single-process reference computed here.
"""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from ssl_lab import dist
from ssl_lab.config import MethodConfig, ModelConfig
from ssl_lab.errors import UserError
from ssl_lab.methods import METHODS, SSLModel, get_method
from ssl_lab.models.encoder import Encoder

WORLD, B = 2, 4  # 2 ranks × 4 samples = a global batch of 8
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # classes span both ranks (supcon positives)
LOSS_SEED = 7
# case -> (method, method.* overrides, number of views)
CASES: dict[str, tuple[str, dict, int]] = {
    "simclr": ("simclr", {}, 2),
    "simclr_k3": ("simclr", {"negatives": 3}, 2),
    "simclr_k1_v3": ("simclr", {"negatives": 1}, 3),
    "supcon": ("supcon", {}, 2),
    "vicreg": ("vicreg", {}, 2),
    "barlow_twins": ("barlow_twins", {}, 2),
    "byol": ("byol", {}, 2),
    "multiview_barlow": ("multiview_barlow", {}, 3),
    "multiview_vicreg": ("multiview_vicreg", {}, 3),
    "supervised": ("supervised", {}, 2),
    "simsiam": ("simsiam", {}, 2),
    "simsiam_v3": ("simsiam", {}, 3),
    "mocov3": ("mocov3", {}, 2),
    "mocov3_v3": ("mocov3", {"temperature": 1.0}, 3),
    "dino": ("dino", {}, 2),
    "dino_v3": ("dino", {"student_temp": 0.2, "warmup_teacher_temp": 0.07}, 3),
}


# ----------------------------------------------------------------------------- shared set-up


def build_model(case: str) -> tuple[SSLModel, MethodConfig]:
    """The tiny model of a case, identical in every process (seeded), BN affine randomised so
    that no gradient is trivially zero (zero_init_residual zeroes the last BN of each block)."""
    name, overrides, _ = CASES[case]
    mc = MethodConfig(name=name, predictor="16", **overrides)
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(width=0.125, projector="32-16"), in_chans=1, image_size=8,
                  mean=[0.5], std=[0.25])
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model = SSLModel(enc, get_method(name), mc, num_classes=3)
    if model.predictor is not None:  # exercise the predictor's BN statistics too
        with torch.no_grad():
            for m in model.predictor.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.weight.uniform_(0.5, 1.5)
    return model.train(), mc


def global_views(case: str) -> torch.Tensor:
    n_views = CASES[case][2]
    return torch.rand(n_views, WORLD * B, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def step_results(model: nn.Module, loss: torch.Tensor) -> dict:
    return {"loss": loss.detach().clone(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def reference_step(case: str) -> dict:
    """One process, the global batch of WORLD·B, plain nn.BatchNorm."""
    model, mc = build_model(case)
    out = model(global_views(case), [])
    loss = get_method(mc.name).loss(out, LABELS, mc, torch.Generator().manual_seed(LOSS_SEED))
    loss.backward()
    return step_results(model, loss)


# ----------------------------------------------------------------------------- the 2 processes


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a hang (a collective one rank never joins) becomes a traceback and a failed test
    faulthandler.dump_traceback_later(240, exit=True)
    # what torchrun sets, with a file rendezvous: no TCP port to race other test runs for
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    info = dist.init_from_env(timeout_s=120, init_method=f"file://{out_dir}/rendezvous")
    try:
        assert (info.rank, info.world_size, info.device.type) == (rank, WORLD, "cpu")
        results = {"info": info, "is_main": dist.is_main(), "gather": _gather_case(rank),
                   "bn": _bn_case(rank), "any": (dist.any_rank(rank == 1), dist.any_rank(False))}
        for case in CASES:
            results[case] = _method_case(case, info)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.cleanup()


def _method_case(case: str, info: dist.DistInfo) -> dict:
    """One step as the training loop takes it: the model inside torch's DDP (which averages
    the gradients during backward), the loss on the gathered global batch."""
    rank = info.rank
    model, mc = build_model(case)
    model = dist.convert_sync_batchnorm(model)
    net = dist.wrap_ddp(model, info)
    views = global_views(case)[:, rank * B:(rank + 1) * B]
    out = net(views, [])
    local_labels = LABELS[rank * B:(rank + 1) * B]
    loss = dist.global_loss(get_method(mc.name).loss, out, local_labels, mc,
                            torch.Generator().manual_seed(LOSS_SEED))
    loss.backward()
    return step_results(model, loss)


def _gather_case(rank: int) -> dict:
    """f(all_gather(X_r @ P)) with P shared (a parameter) and X_r this rank's rows."""
    x_all, p0, weights = _gather_inputs()
    x = x_all[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    p = p0.clone().requires_grad_(True)
    loss = _gather_objective(dist.all_gather(x @ p), weights)
    loss.backward()
    dist.all_reduce_grads([p])
    return {"loss": loss.detach(), "p_grad": p.grad, "x_grad": x.grad}


def _gather_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(WORLD * B, 5, generator=g), torch.randn(5, 3, generator=g),
            torch.randn(WORLD * B, 3, generator=g))


def _gather_objective(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (y.softmax(0) * weights).sum() + y.pow(2).mean()  # couples every row with every row


def _bn_case(rank: int) -> dict:
    """Two training steps of a SyncBatchNorm2d (channels_last input), then eval."""
    x_all, weights = _bn_inputs()
    bn = dist.convert_sync_batchnorm(_bn_module())
    out: dict = {}
    for step in range(2):
        x = x_all[step, rank * B:(rank + 1) * B].clone().to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = bn(x)
        (dist.all_gather(y) * weights).sum().backward()
        out[f"y{step}"], out[f"x_grad{step}"] = y.detach(), x.grad
    dist.all_reduce_grads(bn.parameters())
    out["grads"] = [bn.weight.grad, bn.bias.grad]
    out["state"] = bn.state_dict()
    out["eval"] = bn.eval()(x_all[0, rank * B:(rank + 1) * B]).detach()
    return out


def _bn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return 3 + 2 * torch.randn(2, WORLD * B, 3, 2, 2, generator=g), \
        torch.randn(WORLD * B, 3, 2, 2, generator=g)


def _bn_module() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- distributed tests


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to float32 rounding, on the scale of the whole tensor (element-wise relative
    tolerance fails on entries that are sums cancelling to ~0, e.g. a Linear bias before BN,
    whose true gradient is 0: what is left is rounding noise of its O(1) terms, ~1e-6, which
    a batch-size-dependent GEMM order, as in the small-map convs' matmuls, can shift).
    In float64 the same comparisons agree to ~1e-14."""
    atol = 1e-4 * expected.abs().max().item() + 1e-5
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def test_every_method_has_a_case():
    assert {name for name, _, _ in CASES.values()} == set(METHODS)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_the_global_batch(ranks, case):
    ref = reference_step(case)
    for r, res in enumerate(ranks):
        got = res[case]
        assert_close(got["loss"], ref["loss"], f"rank {r} loss")
        assert got["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            assert_close(got["grads"][name], grad, f"rank {r} grad of {name}")
        for name, buf in ref["buffers"].items():  # BN running stats: global, on every rank
            assert_close(got["buffers"][name].float(), buf.float(), f"rank {r} buffer {name}")


def test_all_gather_gradient_matches_one_process(ranks):
    x_all, p0, weights = _gather_inputs()
    x = x_all.clone().requires_grad_(True)
    p = p0.clone().requires_grad_(True)
    loss = _gather_objective(x @ p, weights)
    loss.backward()
    for r, res in enumerate(ranks):
        got = res["gather"]
        assert_close(got["loss"], loss.detach(), "loss")
        assert_close(got["p_grad"], p.grad, "averaged shared-parameter gradient")
        # the local input's gradient is W × its share: DDP's 1/W average undoes it (dist.py)
        assert_close(got["x_grad"], WORLD * x.grad[r * B:(r + 1) * B], "local input gradient")


def test_sync_batchnorm_matches_batchnorm_on_the_global_batch(ranks):
    x_all, weights = _bn_inputs()
    bn = _bn_module()
    ref: dict = {}
    for step in range(2):
        x = x_all[step].clone().requires_grad_(True)
        y = bn(x)
        (y * weights).sum().backward()
        ref[f"y{step}"], ref[f"x_grad{step}"] = y.detach(), x.grad
    ref_eval = bn.eval()(x_all[0]).detach()
    for r, res in enumerate(ranks):
        got, rows = res["bn"], slice(r * B, (r + 1) * B)
        for step in range(2):
            assert_close(got[f"y{step}"], ref[f"y{step}"][rows], f"output, step {step}")
            assert_close(got[f"x_grad{step}"], WORLD * ref[f"x_grad{step}"][rows], "input grad")
        assert_close(got["grads"][0], bn.weight.grad, "weight grad")
        assert_close(got["grads"][1], bn.bias.grad, "bias grad")
        for key, value in bn.state_dict().items():
            assert_close(got["state"][key], value, key)
        assert_close(got["eval"], ref_eval[rows], "eval output")


def test_process_group_helpers(ranks):
    assert [res["is_main"] for res in ranks] == [True, False]
    assert [res["info"].local_rank for res in ranks] == [0, 1]
    assert all(res["any"] == (True, False) for res in ranks)


# ----------------------------------------------------------------------------- one process


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist.init_from_env()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not tdist.is_initialized() and dist.is_main() and dist.get_world_size() == 1
    x = torch.randn(4, 3, requires_grad=True)
    assert dist.all_gather(x) is x and dist.gather_views(x[None].expand(2, 4, 3)).shape == (2, 4, 3)
    assert dist.any_rank(True) and dist.broadcast_object("run") == "run"
    dist.barrier()
    dist.cleanup()


def test_init_from_env_names_missing_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        dist.init_from_env()


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_is_batchnorm_in_one_process(kind, momentum):
    cls, shape = (nn.BatchNorm1d, (6, 4)) if kind == "1d" else (nn.BatchNorm2d, (6, 4, 3, 3))
    torch.manual_seed(0)
    ref = cls(4, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    sync = dist.convert_sync_batchnorm(cls(4, momentum=momentum))
    sync.load_state_dict(ref.state_dict())
    assert isinstance(sync, dist.SyncBatchNorm) and isinstance(sync, cls)
    for _ in range(3):  # training: batch statistics, running stats updated
        x = torch.randn(*shape) * 2 + 1
        torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value, rtol=0, atol=0)
    x = torch.randn(*shape)
    torch.testing.assert_close(sync.eval()(x), ref.eval()(x), rtol=0, atol=0)


def test_sync_batchnorm_gradients_equal_batchnorm_in_one_process():
    ref = nn.BatchNorm2d(3)
    sync = dist.convert_sync_batchnorm(nn.BatchNorm2d(3))
    x = torch.randn(5, 3, 4, 4)
    weights = torch.randn(5, 3, 4, 4)
    grads = []
    for bn in (ref, sync):
        xi = x.clone().requires_grad_(True)
        (bn(xi) * weights).sum().backward()
        grads.append([xi.grad, bn.weight.grad, bn.bias.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_sync_batchnorm_keeps_parameters_and_state_dict():
    model, _ = build_model("byol")
    before = model.state_dict()
    params = list(model.parameters())
    model = dist.convert_sync_batchnorm(model)
    plain = [m for m in model.modules() if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)]
    assert not plain  # encoder, predictor and the BYOL target are all converted
    assert sum(isinstance(m, dist.SyncBatchNorm) for m in model.target.modules()) > 0
    assert list(model.parameters()) == params  # the same Parameter objects, in the same order
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_indices_cover_each_global_batch_once(world):
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    per_rank = 4
    steps = len(perm) // (world * per_rank)
    for step in range(steps):
        shards = [dist.shard_indices(perm, r, world, per_rank, step) for r in range(world)]
        assert all(len(s) == per_rank for s in shards)
        start = step * world * per_rank
        # rank order = the single-process batch order, so all_gather restores it exactly
        assert torch.equal(torch.cat(shards), perm[start:start + world * per_rank])
    with pytest.raises(ValueError, match="does not fit"):
        dist.shard_indices(perm, 0, world, per_rank, steps)


def test_per_rank_batch_requires_a_multiple_of_the_world_size():
    assert dist.per_rank_batch(256, 4) == 64
    with pytest.raises(UserError, match="divisible"):
        dist.per_rank_batch(250, 4)


def test_generator_seeds():
    from ssl_lab.seeding import rank_generator_seed, shared_generator_seed, step_generator

    cpu = torch.device("cpu")
    # rank 0 keeps train.py's single-process seed: 1 process under torchrun changes nothing
    assert rank_generator_seed(5, 17, 0) == step_generator(cpu, 5, 17).initial_seed()
    seeds = {rank_generator_seed(5, s, r) for s in range(100) for r in range(8)}
    shared = {shared_generator_seed(5, s) for s in range(100)}
    assert len(seeds) == 800 and len(shared) == 100 and not seeds & shared


# ----------------------------------------------------------------------------- DINO's training step


def _dino_steps(rank: int, world: int) -> dict:
    """Two DINO training steps (multi-crop, clipping, the last layer unfrozen at step 1, SGD)
    on rank `rank`'s shard of a global batch of WORLD·B: losses, centers and final weights."""
    from ssl_lab.methods import Progress

    mc = MethodConfig(name="dino", momentum=0.9, center_momentum=0.8, clip_grad=0.3,
                      freeze_last_layer_epochs=0.5, warmup_teacher_temp=0.06,
                      warmup_teacher_temp_epochs=2)
    torch.manual_seed(0)
    enc = Encoder(ModelConfig(width=0.125, projector="16g-16g-8u-32w"), in_chans=1,
                  image_size=8, mean=[0.5], std=[0.25])
    model = SSLModel(enc, get_method("dino"), mc, num_classes=3).train()
    if world > 1:
        model = dist.convert_sync_batchnorm(model)
    opt = torch.optim.SGD([p for m in model.trainable_modules() for p in m.parameters()], lr=0.5)
    rows = slice(rank * B * WORLD // world, (rank + 1) * B * WORLD // world)
    out_rec: dict = {"loss": [], "center": []}
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        views, small = torch.rand(2, WORLD * B, 1, 8, 8, generator=g), \
            torch.rand(3, WORLD * B, 1, 4, 4, generator=g)
        model.begin_step(Progress(step, 4, 2))
        out = model(views[:, rows], [], small[:, rows])
        loss = dist.global_loss(get_method("dino").loss, out, LABELS[rows], mc, None)
        loss.backward()
        dist.all_reduce_grads(model.parameters())
        model.before_update()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.end_step(out)
        out_rec["loss"].append(loss.detach().clone())
        out_rec["center"].append(model.center.clone())
    out_rec["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out_rec


def _dino_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(240, exit=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_from_env(timeout_s=120, init_method=f"file://{out_dir}/rendezvous")
    try:
        torch.save(_dino_steps(rank, WORLD), Path(out_dir) / f"dino{rank}.pt")
    finally:
        dist.cleanup()


def test_dino_training_steps_with_center_update_equal_one_process(tmp_path):
    """The center is the EMA of the GLOBAL batch's teacher outputs on every rank, so the second
    step's loss (which reads it), the teacher and the student match one process too."""
    mp.spawn(_dino_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ref = _dino_steps(0, 1)
    assert ref["center"][0].abs().sum() > 0 and not torch.equal(ref["center"][0], ref["center"][1])
    for r in range(WORLD):
        got = torch.load(tmp_path / f"dino{r}.pt", weights_only=False)
        for step in range(2):
            assert_close(got["loss"][step], ref["loss"][step], f"rank {r} loss, step {step}")
            assert_close(got["center"][step], ref["center"][step], f"rank {r} center, step {step}")
        for name, value in ref["params"].items():
            assert_close(got["params"][name], value, f"rank {r} {name} after two steps")
