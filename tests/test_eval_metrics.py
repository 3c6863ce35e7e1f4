"""Offline evaluation metrics on hand-made features with known answers."""

import math

import pytest
import torch

from ssl_lab.eval import metrics as M


def _blobs(n: int, dim: int, classes: int, sep: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Gaussian blobs around `classes` random centres `sep` apart (scaled unit vectors)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1) * sep
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def _splits(x: torch.Tensor, y: torch.Tensor, n_train: int, n_val: int) -> tuple:
    return (x[:n_train], y[:n_train], x[n_train:n_train + n_val], y[n_train:n_train + n_val],
            x[n_train + n_val:], y[n_train + n_val:])


# ----------------------------------------------------------------------------- standardize
def test_standardize_uses_train_statistics_only():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 2.0, 5.0, 0.1]) + 3.0
    other = torch.randn(80, 4, generator=g) * 10 - 7  # very different statistics
    s_train, s_other = M.standardize(train, other)
    assert torch.allclose(s_train.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(s_train.std(0, correction=0), torch.ones(4), atol=1e-4)
    expected = (other - train.mean(0)) / train.std(0, correction=0)
    assert torch.allclose(s_other, expected, atol=1e-4)
    # `other` is not standardised with its own statistics
    assert s_other.mean(0).abs().min() > 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_linear_probe_standardises_into_the_transposed_layout_bit_for_bit(dtype):
    """The probe's memory-saving path (no (N, D) standardised copy) is `standardize` exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9000, 7, generator=g) * torch.tensor([1.0, 2, 5, 0.1, 3, 1, 1]) + 3.0
    x[:, 5] = 2.0  # a constant column: only centred
    x = (x > 3.0) if dtype == torch.bool else x
    train, val, test = x[:6000], x[6000:7000], x[7000:]
    xt, xva, xte, rows = M._standardize_transposed(train, val, test)
    s_train, s_val, s_test = M.standardize(train, val, test)
    assert xt.is_contiguous() and torch.equal(xt, s_train.T)
    assert torch.equal(xva, s_val) and torch.equal(xte, s_test)
    assert torch.equal(rows, s_train[:: max(1, 6000 // M._COV_ROWS)])


@pytest.mark.parametrize("threads", [1, 2])
def test_train_stats_are_torchs_column_stats_bit_for_bit(threads):
    """The probe takes the std over the rows of a transposed copy (faster); it must be the
    same bits as torch's std over dim 0, so that earlier results still reproduce."""
    g = torch.Generator().manual_seed(11)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, d in ((5400, 64), (3000, 7), (2000, 300)):
            x = torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 5 + 1
            for feats in (x, (x > 1).float()):
                xt, mean, std = M._train_stats(feats)
                assert torch.equal(xt, feats.t()) and xt.is_contiguous()
                assert torch.equal(mean, feats.mean(0))
                ref = feats.std(0, correction=0)
                assert torch.equal(std, torch.where(ref > 1e-6, ref, torch.ones_like(ref)))
    finally:
        torch.set_num_threads(before)


def test_standardize_constant_train_column_is_only_centred():
    train = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    other = torch.tensor([[1.0, 5.0]])
    s_train, s_other = M.standardize(train, other)
    assert torch.equal(s_train[:, 1], torch.zeros(2))
    assert s_other[0, 1] == pytest.approx(3.0)  # 5 - 2, not divided by ~0
    assert s_other[0, 0] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_separable_blobs_near_perfect():
    x, y = _blobs(1600, 16, 4, sep=12.0, seed=1)
    out = M.linear_probe(*_splits(x, y, 1000, 300), num_classes=4)
    assert out["test"] >= 0.99 and out["val"] >= 0.99
    assert out["weight_decay"] in M.WEIGHT_DECAYS
    assert set(out["val_by_wd"]) == set(M.WEIGHT_DECAYS)


@pytest.mark.parametrize("wd", [1e-2, 1e-4])
def test_linear_probe_matches_sklearn_on_digits(wd):
    # Same objective as LogisticRegression(C = 1 / (wd · n_train)) on standardised features.
    datasets = pytest.importorskip("sklearn.datasets")
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = datasets.load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(x, dtype=torch.float32)[perm], torch.tensor(y)[perm]
    splits = _splits(x, y, 1000, 300)
    ours = M.linear_probe(*splits, num_classes=10, weight_decays=(wd,), max_iter=100)
    s_train, s_test = M.standardize(splits[0], splits[4])
    ref = linear_model.LogisticRegression(C=1 / (wd * 1000), max_iter=2000, tol=1e-6)
    ref.fit(s_train.numpy(), splits[1].numpy())
    assert ours["test"] == pytest.approx(ref.score(s_test.numpy(), splits[5].numpy()), abs=0.01)


def test_linear_probe_random_labels_near_chance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 20, generator=g)
    y = torch.randint(4, (3000,), generator=g)
    out = M.linear_probe(*_splits(x, y, 2000, 500), num_classes=4)
    assert 0.17 < out["test"] < 0.33


def test_linear_probe_chooses_best_val_weight_decay():
    x, y = _blobs(900, 40, 3, sep=2.0, seed=3)
    out = M.linear_probe(*_splits(x, y, 300, 300), num_classes=3,
                         weight_decays=(0.0, 1e-3, 1e-1, 1.0))
    best = max(out["val_by_wd"].values())
    # brute force over the grid; ties go to the larger weight decay
    winners = [wd for wd, acc in out["val_by_wd"].items() if acc == best]
    assert out["weight_decay"] == max(winners)
    assert out["val"] == best


def test_linear_probe_heavy_weight_decay_wins_when_features_are_noise():
    # Train labels are 80% class 0 and unrelated to the features; val is all class 0.
    # A huge wd shrinks W to 0, the bias predicts the majority class: val = 1. An
    # unregularised fit memorises noise and gets some val points wrong.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 50, generator=g)
    y = (torch.rand(400, generator=g) < 0.2).long()
    y[200:] = 0
    out = M.linear_probe(x[:200], y[:200], x[200:300], y[200:300], x[300:], y[300:],
                         num_classes=2, weight_decays=(0.0, 100.0))
    assert out["val_by_wd"][100.0] == 1.0
    assert out["val_by_wd"][0.0] < 1.0
    assert out["weight_decay"] == 100.0 and out["test"] == 1.0
    # ... and a light wd wins when the features do carry the label
    x, y = _blobs(900, 40, 3, sep=6.0, seed=5)
    out = M.linear_probe(*_splits(x, y, 300, 300), num_classes=3, weight_decays=(1e-3, 100.0))
    assert out["weight_decay"] == 1e-3


def test_linear_probe_never_selects_on_test():
    x, y = _blobs(900, 40, 3, sep=2.0, seed=6)
    splits = _splits(x, y, 300, 300)
    ref = M.linear_probe(*splits, num_classes=3, weight_decays=(0.0, 1e-2, 1.0))
    corrupted = (*splits[:5], (splits[5] + 1) % 3)
    out = M.linear_probe(*corrupted, num_classes=3, weight_decays=(0.0, 1e-2, 1.0))
    assert out["weight_decay"] == ref["weight_decay"]
    assert out["val_by_wd"] == ref["val_by_wd"]
    assert out["test"] < 0.5 < ref["test"]


# ----------------------------------------------------------------------------- kNN
def _unit(deg: list[float]) -> torch.Tensor:
    rad = torch.tensor(deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], 1).float()


def test_knn_matches_manual_weighted_vote():
    # test point at 0°; neighbours: label 0 at 0°, label 1 at ±60°, label 1 at 180° (far).
    train = _unit([0.0, 60.0, -60.0, 180.0]) * torch.tensor([[2.0], [0.5], [3.0], [1.0]])
    train_y = torch.tensor([0, 1, 1, 1])
    test = _unit([0.0])
    # k=3: majority vote says 1, the weights say 0: exp(1/0.1) > 2·exp(0.5/0.1)
    assert math.exp(10) > 2 * math.exp(5)
    assert M.knn_classify(train, train_y, test, torch.tensor([0]), num_classes=2, k=3) == 1.0
    # a large temperature flattens the weights back into a majority vote
    acc = M.knn_classify(train, train_y, test, torch.tensor([1]), num_classes=2, k=3,
                         temperature=100.0)
    assert acc == 1.0


def _manual_knn(train, train_y, test, k, temperature, classes):
    preds = []
    for q in test:
        sims = [float(torch.nn.functional.cosine_similarity(q, t, dim=0)) for t in train]
        order = sorted(range(len(train)), key=lambda i: (-sims[i], i))[:k]
        scores = [0.0] * classes
        for i in order:
            scores[int(train_y[i])] += math.exp(sims[i] / temperature)
        preds.append(max(range(classes), key=lambda c: (scores[c], -c)))
    return torch.tensor(preds)


def test_knn_equals_brute_force_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(7)
    train, train_y = torch.randn(60, 3, generator=g), torch.randint(3, (60,), generator=g)
    test = torch.randn(25, 3, generator=g)
    pred = _manual_knn(train, train_y, test, k=5, temperature=0.1, classes=3)
    for chunk in (1, 7, 1024):
        acc = M.knn_classify(train, train_y, test, pred, num_classes=3, k=5, chunk=chunk)
        assert acc == 1.0
    # k larger than the train set is clipped (every point votes)
    pred_all = _manual_knn(train, train_y, test, k=60, temperature=0.1, classes=3)
    assert M.knn_classify(train, train_y, test, pred_all, num_classes=3, k=200) == 1.0


def test_knn_uses_raw_normalised_features_and_breaks_ties_by_index():
    g = torch.Generator().manual_seed(8)
    train, train_y = torch.randn(50, 4, generator=g), torch.randint(2, (50,), generator=g)
    test, test_y = torch.randn(30, 4, generator=g), torch.randint(2, (30,), generator=g)
    ref = M.knn_classify(train, train_y, test, test_y, num_classes=2, k=7)
    scale = torch.rand(50, 1, generator=g) * 10 + 0.1  # per-sample scale is normalised away
    assert M.knn_classify(train * scale, train_y, test, test_y, num_classes=2, k=7) == ref
    # two identical train points tied for the single slot: the lower index votes
    dup = _unit([90.0, 90.0, 180.0])
    q = _unit([0.0])
    assert M.knn_classify(dup, torch.tensor([1, 0, 0]), q, torch.tensor([1]),
                          num_classes=2, k=1) == 1.0
    assert M.knn_classify(dup, torch.tensor([0, 1, 1]), q, torch.tensor([0]),
                          num_classes=2, k=1) == 1.0


def test_topk_with_many_ties_equals_a_stable_sort():
    """Rows tied across the k-th place (common for low-dim or untrained features) must keep
    exactly what a stable descending sort keeps first: the values and the lower indices."""
    g = torch.Generator().manual_seed(9)
    sim = torch.randint(0, 6, (40, 300), generator=g).float() / 5  # 6 values: ties everywhere
    sim[::7] = torch.rand(6, 300, generator=g)  # and some rows without ties
    for k in (1, 5, 37, 299):
        ref_vals, ref_idx = sim.sort(dim=1, descending=True, stable=True)
        vals, idx = M._topk_lowest_index_ties(sim, k)
        assert torch.equal(vals, ref_vals[:, :k])
        # the kept set must match; the order among equal values above the k-th is topk's
        assert torch.equal(idx.sort(dim=1).values, ref_idx[:, :k].sort(dim=1).values)


@pytest.mark.parametrize("width", [5000, 5013])  # a multiple of the block width, and a tail
def test_block_pruned_topk_equals_a_stable_sort(width):
    """Wide rows go through the block-maxima pruning: the kept values and indices must still
    be exactly a stable sort's, with ties inside, across and at the edge of the kept blocks."""
    g = torch.Generator().manual_seed(10)
    k = 20
    sim = torch.rand(60, width, generator=g)
    sim[:20] = (sim[:20] * 40).round() / 40  # 41 values: heavy ties, block maxima tie too
    sim[20:30, -5:] = 2.0  # the largest values sit in the last columns (tail, if any)
    row = sim[30:40]
    top = row.topk(k, dim=1).values[:, -1:]
    row[:, ::97] = top  # the k-th value repeated in many blocks
    assert M._block_candidates(sim, k) is not None  # the pruned path is the one under test
    ref_vals, ref_idx = sim.sort(dim=1, descending=True, stable=True)
    vals, idx = M._topk_lowest_index_ties(sim, k)
    assert torch.equal(vals, ref_vals[:, :k])
    assert torch.equal(idx.sort(dim=1).values, ref_idx[:, :k].sort(dim=1).values)


# ----------------------------------------------------------------------------- statistics
def test_zero_fraction():
    x = torch.tensor([[0.0, 1.0, -2.0, 0.0], [3.0, 0.0, 1e-30, 4.0]])
    assert M.zero_fraction(x) == pytest.approx(3 / 8)
    assert M.zero_fraction(torch.relu(-torch.ones(5, 5))) == 1.0


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_rankme_of_equal_singular_values_is_the_rank(rank):
    g = torch.Generator().manual_seed(rank)
    u, _ = torch.linalg.qr(torch.randn(200, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, rank, generator=g))
    x = 5.0 * u @ v.T  # rank `rank`, all non-zero singular values equal to 5
    assert M.rankme(x) == pytest.approx(rank, rel=1e-3)
    assert M.rankme(x.T) == pytest.approx(rank, rel=1e-3)  # wide matrices too


def test_rankme_full_rank_gaussian_is_high():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    assert 15.0 < M.rankme(x) <= 16.0


# ----------------------------------------------------------------------------- MLP, binarised
def test_mlp_probe_solves_xor_a_linear_probe_cannot():
    g = torch.Generator().manual_seed(9)
    x = torch.rand(3000, 2, generator=g) * 2 - 1
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    splits = _splits(x, y, 2000, 500)
    assert M.linear_probe(*splits, num_classes=2)["test"] < 0.7
    out = M.mlp_probe(*splits, num_classes=2, hidden=64, epochs=8, batch_size=128)
    assert out["test"] > 0.9 and 1 <= out["epoch"] <= 8
    again = M.mlp_probe(*splits, num_classes=2, hidden=64, epochs=8, batch_size=128)
    assert again == out  # seeded


def test_binarized_probe_uses_sign_pattern():
    # The label is the magnitude of a positive feature: (x > 0) erases it.
    g = torch.Generator().manual_seed(10)
    y = torch.randint(2, (1500,), generator=g)
    x = torch.stack([1.0 + y.float(), torch.randn(1500, generator=g)], 1)
    splits = _splits(x, y, 1000, 250)
    out = M.evaluate_layer(*splits, num_classes=2)
    assert out["linear_test"] == 1.0
    assert out["binarized_test"] < 0.7
    binary = [t if i % 2 else (t > 0).float() for i, t in enumerate(splits)]
    assert out["binarized_test"] == M.linear_probe(*binary, num_classes=2)["test"]


def test_evaluate_layer_keys_and_ranges():
    x, y = _blobs(1200, 8, 3, sep=8.0, seed=11)
    x = torch.relu(x)
    splits = _splits(x, y, 800, 200)
    keys = {"linear_val", "linear_test", "knn_test", "zero_frac", "binarized_test", "rankme"}
    out = M.evaluate_layer(*splits, num_classes=3)
    assert set(out) == keys
    assert out["zero_frac"] == M.zero_fraction(splits[4])
    assert out["rankme"] == M.rankme(splits[4])
    with_mlp = M.evaluate_layer(*splits, num_classes=3, mlp=True)
    assert set(with_mlp) == keys | {"mlp_test"}
    for name in keys - {"rankme"} | {"mlp_test"}:
        assert 0.0 <= with_mlp[name] <= 1.0
    assert with_mlp["linear_test"] > 0.9 and with_mlp["knn_test"] > 0.9


def test_bad_inputs_fail_with_a_clear_message():
    x, y = torch.randn(20, 3), torch.randint(2, (20,))
    with pytest.raises(ValueError, match="labels must lie"):
        M.linear_probe(x, y + 5, x, y, x, y, num_classes=2)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="val: features contain NaN"):
        M.linear_probe(x, y, bad, y, x, y, num_classes=2)
    bad[3, 1] = -float("inf")
    with pytest.raises(ValueError, match="train: features contain NaN or inf"):
        M.knn_classify(bad, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="test: expected features"):
        M.knn_classify(x, y, x[:5], y, num_classes=2)


def test_evaluate_layer_passes_the_knn_settings_on():
    """eval.knn_k / eval.knn_temperature must reach the per-layer kNN (they once did not)."""
    x, y = _blobs(900, 8, 3, sep=1.0, seed=12)  # overlapping blobs: k matters
    splits = _splits(x, y, 600, 150)
    train_x, train_y, _, _, test_x, test_y = splits
    out = M.evaluate_layer(*splits, num_classes=3, knn_k=1, knn_temperature=0.5)
    one_nn = M.knn_classify(train_x, train_y, test_x, test_y, num_classes=3, k=1, temperature=0.5)
    default = M.knn_classify(train_x, train_y, test_x, test_y, num_classes=3)
    assert out["knn_test"] == one_nn
    assert one_nn != default
    assert M.evaluate_layer(*splits, num_classes=3)["knn_test"] == default


# ----------------------------------------------------------------------------- probe internals
@pytest.mark.parametrize("n, dim", [(1003, 7), (5, 3), (64, 0)])
def test_chunked_loss_and_gradient_match_the_definition(n, dim):
    """The probe's (K, N) loss-and-gradient pass, its forward GEMM split into column chunks
    (with a remainder, fewer columns than chunks, no feature at all), against mean
    cross-entropy + wd/2·||W||² written per sample in float64, differentiated by autograd."""
    from ssl_lab.eval.linear import _Dense

    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, dim, generator=g), torch.randint(4, (n,), generator=g)
    theta, wd = torch.randn(dim + 1, 4, generator=g) * 0.3, 1e-2
    ref = theta.double().requires_grad_()
    w, b = ref[:-1], ref[-1]
    loss = sum(-torch.log_softmax(x[i].double() @ w + b, 0)[y[i]] for i in range(n)) / n
    loss = loss + 0.5 * wd * (w * w).sum()
    loss.backward()
    f, grad = _Dense(x.T.contiguous(), y, 4).loss_grad(theta, wd)
    assert f == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(grad.double(), ref.grad, atol=1e-5)


def test_constant_train_columns_leave_the_linear_probe_unchanged():
    """Exactly-zero standardised train columns are left out of the fit: the probe must be the
    same as without them, whatever val and test hold in those columns."""
    x, y = _blobs(1200, 6, 3, sep=2.5, seed=13)
    splits = list(_splits(x, y, 700, 250))
    ref = M.linear_probe(*splits, num_classes=3)
    g = torch.Generator().manual_seed(14)
    for i in (0, 2, 4):  # a constant column in train; anything in val / test
        extra = torch.full((len(splits[i]), 2), 3.0) if i == 0 else \
            torch.randn(len(splits[i]), 2, generator=g)
        splits[i] = torch.cat([splits[i][:, :2], extra, splits[i][:, 2:]], 1)
    out = M.linear_probe(*splits, num_classes=3)
    assert out["weight_decay"] == ref["weight_decay"]
    assert out["val_by_wd"] == pytest.approx(ref["val_by_wd"], abs=1 / 250)
    assert out["test"] == pytest.approx(ref["test"], abs=1 / 250)
