"""RCDM's faithfulness-by-retrieval score against a brute-force reference written from docs/rcdm.md
(not from rcdm.py): query = a sample's representation, rank (1 = best) of its conditioning image
among the N gallery images by cosine similarity, ties sharing the average rank; float64 and
explicit loops. Also the diversity figure, and `rcdm score` end to end on fixed representations."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl_lab.gen import rcdm, rcdm_score
from ssl_lab.gen.rcdm_config import ScoreArgs


def ref_cosine(u, v) -> float:
    dot = math.fsum(float(a) * float(b) for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(math.fsum(float(a) ** 2 for a in u))
                  * math.sqrt(math.fsum(float(b) ** 2 for b in v)))


def ref_ranks(query, gallery, target) -> list[float]:
    """Sort the gallery by similarity; a tie group occupying positions p+1 .. p+g gets their
    average, p + (g + 1) / 2, i.e. 1 + (#strictly better) + (#tied others) / 2."""
    ranks = []
    for q, own in zip(query, target, strict=True):
        sims = [ref_cosine(q, g) for g in gallery]
        better = sum(1 for s in sims if s > sims[own])
        tied = sum(1 for j, s in enumerate(sims) if j != own and s == sims[own])
        ranks.append(1 + better + tied / 2)
    return ranks


def ref_report(ranks: list[float]) -> dict[str, float]:
    return {"mean_rank": math.fsum(ranks) / len(ranks),
            "top1": sum(r <= 1 for r in ranks) / len(ranks),
            "top5": sum(r <= 5 for r in ranks) / len(ranks)}


def ref_chance(n: int) -> dict[str, float]:
    """Chance by enumeration: the target's rank under every ordering of an n-image gallery."""
    positions = [perm.index(0) + 1 for perm in itertools.permutations(range(n))]
    return {"chance_mean_rank": sum(positions) / len(positions),
            "chance_top1": sum(p <= 1 for p in positions) / len(positions),
            "chance_top5": sum(p <= 5 for p in positions) / len(positions)}


def ref_pixel_std(stack) -> float:
    """Mean over pixels of the (population) std across the first axis, [0, 1] units."""
    x = np.asarray(stack, np.float64).reshape(len(stack), -1) / 255
    stds = []
    for p in range(x.shape[1]):
        mu = math.fsum(x[:, p]) / len(x)
        stds.append(math.sqrt(math.fsum((v - mu) ** 2 for v in x[:, p]) / len(x)))
    return math.fsum(stds) / len(stds)


def _ranks(query, gallery, target) -> list[float]:
    t = torch.as_tensor(target)
    return rcdm.retrieval_ranks(torch.as_tensor(query), torch.as_tensor(gallery), t).tolist()


# A 3-image gallery on the plane, ranks worked out by hand (cosines in brackets, per gallery row).
HAND_GALLERY = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
HAND_CASES = [([1.0, 0.1], 0, 1.0),    # (.995, .0995, .778): own is the best
              ([1.0, 0.1], 1, 3.0),    # own is the worst
              ([1.0, 0.1], 2, 2.0),
              ([1.0, 1.0], 0, 2.5),    # (.707, .707, 1): one better, one tie -> 1 + 1 + 1/2
              ([1.0, 1.0], 2, 1.0),
              ([-1.0, -1.0], 2, 3.0),  # (-.707, -.707, -1): cosine, not |cosine|
              ([0.0, 3.0], 0, 3.0),    # (0, 1, .707): the scale of the query does not matter
              ([0.1, 0.1], 2, 1.0)]    # (.707, .707, 1): by L2 distance it would rank 3


def test_hand_worked_three_image_gallery():
    query = [q for q, _, _ in HAND_CASES]
    target = [t for _, t, _ in HAND_CASES]
    expected = [r for _, _, r in HAND_CASES]
    assert ref_ranks(query, HAND_GALLERY, target) == expected
    assert _ranks(query, HAND_GALLERY, target) == expected
    rep = rcdm.retrieval_report(torch.tensor(expected), 3)
    assert rep["mean_rank"] == pytest.approx(16.5 / 8) and rep["top1"] == pytest.approx(3 / 8)
    assert rep["top5"] == 1.0 and rep["n"] == 3 and rep["queries"] == 8
    assert rep["chance_mean_rank"] == 2.0 and rep["chance_top1"] == pytest.approx(1 / 3)


def _planted(seed: int, n: int, m: int, d: int):
    """Gaussian data with ties that are exact in any float precision: duplicated rows and
    power-of-two multiples (cosine is scale-free, and x2 / x0.5 round no bit)."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n, d)).astype(np.float32)
    gallery[3], gallery[7] = gallery[1], 0.5 * gallery[1]  # a three-way tie group {1, 3, 7}
    gallery[5] = 2.0 * gallery[2]                           # a pair {2, 5}
    query = rng.standard_normal((m, d)).astype(np.float32)
    query[:4] = gallery[[0, 1, 5, 8]]                       # exact copies of gallery rows
    query[4] = -gallery[2]                                  # the opposite direction
    query[5:8] = query[8:11]                                # duplicated queries
    target = rng.integers(0, n, m)
    target[:12] = [0, 1, 2, 8, 2, 3, 7, 5, 1, 4, 6, 0]      # tied and untied targets
    return query, gallery, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_equal_the_brute_force_reference_with_planted_ties(seed):
    n = 9
    query, gallery, target = _planted(seed, n, 40, 5)
    expected = ref_ranks(query, gallery, target)
    assert any(r != int(r) for r in expected)  # the planted ties are in play
    assert _ranks(query, gallery, target) == expected  # exactly, rank by rank
    rep = rcdm.retrieval_report(torch.tensor(expected), n)
    for key, value in (ref_report(expected) | ref_chance(n)).items():
        assert rep[key] == pytest.approx(value, rel=1e-6), key
    assert rep["n"] == n and rep["queries"] == 40


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_chance_fields_match_enumeration_and_a_collapsed_gallery(n):
    rep = rcdm.retrieval_report(torch.ones(3), n)
    for key, value in ref_chance(n).items():
        assert rep[key] == pytest.approx(value, rel=1e-12), key
    # a collapsed representation: every gallery row ties, so every rank is chance
    query = np.random.default_rng(n).standard_normal((4, 3))
    ranks = _ranks(query, np.ones((n, 3)), [0, 1, n - 1, 0])
    assert ranks == ref_ranks(query, np.ones((n, 3)), [0, 1, n - 1, 0]) == [(n + 1) / 2] * 4


def test_median_rank_is_the_median():
    ranks = [1.0, 1.0, 2.0, 2.5, 3.0, 3.0]
    assert rcdm.retrieval_report(torch.tensor(ranks), 3)["median_rank"] == \
        statistics.median(ranks)  # 2.25; reported: 2.0


def test_a_positive_multiple_ties_with_its_original():
    gallery = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    gallery[1] = 3 * gallery[0]
    query = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
    ranks = _ranks(query, gallery, [0] * 30)
    assert all(r != int(r) for r in ranks)  # {0, 1} always tie: x.5 ranks, by hand


def test_identical_gallery_rows_always_tie():
    gen = np.random.default_rng(0)
    for n, d in itertools.product(range(3, 11), range(2, 10)):
        gallery = gen.standard_normal((n, d)).astype(np.float32)
        gallery[n - 1] = gallery[0]
        query = gen.standard_normal((3 * n, d)).astype(np.float32)
        target = [0] * (3 * n)
        assert _ranks(query, gallery, target) == ref_ranks(query, gallery, target), (n, d)


def test_diversity_matches_the_reference():
    samples = np.random.default_rng(0).integers(0, 256, (4, 3, 5, 5, 1), dtype=np.uint8)
    samples[2] = samples[2, :1]  # k identical samples: no diversity
    got = rcdm.diversity(torch.from_numpy(samples)).tolist()
    assert got == pytest.approx([ref_pixel_std(s) for s in samples], rel=1e-6, abs=1e-7)
    assert got[2] == 0


def test_score_command_reports_the_reference_on_fixed_representations(tmp_path, monkeypatch):
    """`rcdm score` with the model replaced by fixed arrays (no training): the representations
    are a fixed projection of the pixels, and every sample is a noisy copy of a known image."""
    n, k, side = 8, 3, 4
    rng = np.random.default_rng(7)
    cond = rng.integers(0, 256, (n, side, side, 1), dtype=np.uint8)
    cond[4] = cond[1]  # two identical held-out images: a planted tie
    src = [[(i + j) % n for j in range(k)] for i in range(n)]  # sample j>0 copies another image
    noise = rng.integers(-25, 26, (n, k, side, side, 1))
    samples = np.clip(cond[np.array(src)].astype(int) + noise, 0, 255).astype(np.uint8)
    samples[0, 0], samples[3, 0] = cond[0], cond[3]  # exact copies of their source
    proj = rng.standard_normal((side * side, 5))

    def fake_features(built, images, desc=""):
        flat = np.asarray(images, np.float64).reshape(len(images), -1) / 255
        return torch.from_numpy(flat @ proj).float()

    cfg = SimpleNamespace(sample=SimpleNamespace(k=k, steps=2, seed=0, eta=0.0, batch_size=8),
                          score=SimpleNamespace(n=n, split="test"))
    built = SimpleNamespace(cfg=cfg, spec={"layer": "backbone", "random_init": False,
                                           "encoder": "fake"})
    monkeypatch.setattr(rcdm_score, "load_run", lambda run_dir: built)
    monkeypatch.setattr(rcdm_score, "held_out", lambda b, split, n_: (cond, np.arange(n)))
    monkeypatch.setattr(rcdm_score, "sample_images", lambda *a: {
        "conditioning": cond, "samples": samples, "features": fake_features(None, cond).numpy()})
    monkeypatch.setattr(rcdm_score, "features", fake_features)
    report = rcdm_score.score_command(tmp_path, ScoreArgs())

    queries = [samples[i, j] for i in range(n) for j in range(k)]
    target = [i for i in range(n) for _ in range(k)]
    feats = ref_ranks(fake_features(None, np.stack(queries)).tolist(),  # the same call as score's
                      fake_features(None, cond).tolist(), target)
    mean_img = cond.reshape(n, -1).astype(np.float64).mean(0) / 255
    pixels = ref_ranks([q.reshape(-1) / 255 - mean_img for q in queries],
                       [c.reshape(-1) / 255 - mean_img for c in cond], target)
    assert any(r > 1 for r in feats) and any(r != int(r) for r in feats)
    for got, ranks in ((report["retrieval"], feats), (report["retrieval_pixels"], pixels)):
        for key, value in (ref_report(ranks) | ref_chance(n)).items():
            assert got[key] == pytest.approx(value, rel=1e-6), key
        assert got["n"] == n and got["queries"] == n * k
    diversities = [ref_pixel_std(s) for s in samples]
    assert report["diversity"]["mean"] == pytest.approx(statistics.fmean(diversities), rel=1e-5)
    assert report["data_pixel_std"] == pytest.approx(ref_pixel_std(cond), rel=1e-5)
    saved = json.loads((tmp_path / "score.json").read_text())
    assert saved["retrieval"] == report["retrieval"]
