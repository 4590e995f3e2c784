"""Every view op and composition, end to end: stage one labels the views, ``verify --teacher`` replays them
and reproduces the cached logits, the store is the same whatever the batch size and number of dask workers,
and stage two renders the same pixels (mixed views included) in any batch size and worker count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_same_arrays

import kdcache
from kdcache.loader import CachedLoader
from kdcache.views import VIEW_OPS, policy_from_spec

T = "kdcache.models:small_cnn"  # a seeded random CNN, stored as "small_cnn"
# every registered op in at least one composition (test_every_op_is_covered keeps this list complete)
POLICIES = [
    "identity",
    "crop-flip | randaugment:n=2,magnitude=uniform,space=sld | cutout:0.5",
    "crop-flip | randaugment:n=3,magnitude=9",
    "rrc-flip:scale=0.3..1 | trivialaugment",
    "crop-flip | autoaugment:policy=cifar10 | random-erasing:p=0.5,value=random",
    "rrc-flip | cutmix:alpha=1.0,p=0.5 | mixup:alpha=0.8",
]
RICH = "rrc-flip:scale=0.3..1 | trivialaugment | random-erasing:p=0.5,value=random | cutmix:p=0.5 | mixup"


def test_every_op_is_covered():
    used = {op.name for spec in POLICIES for op in policy_from_spec(spec).ops}
    assert used == set(VIEW_OPS)


def _teach(out, policy, views=2, **kw):
    return kdcache.teach("digits", teachers=[T], out=str(out), split="test", k="all", views=views,
                         view_policy=policy, shard_rows=128, chunk_rows=64, device="cpu", progress=False, **kw)


@pytest.mark.parametrize("policy", POLICIES)
def test_verify_replays_what_the_teacher_saw(policy, tmp_path):
    _teach(tmp_path / "s.kdc", policy, views=1 if policy == "identity" else 2)
    report = kdcache.verify(str(tmp_path / "s.kdc"), teacher=T, samples=96)
    assert report.ok, report.problems
    (replay,) = report.replays
    assert replay.top1_agreement == 1.0
    # the stored float16 logits (|z| < 2 for this random CNN: a float16 step is <= 2^-10) against the live ones
    assert replay.max_abs_diff <= 2**-10


def test_the_store_is_the_same_for_any_batch_size_and_number_of_workers(tmp_path):
    _teach(tmp_path / "a.kdc", RICH, batch_size=64)
    _teach(tmp_path / "b.kdc", RICH, batch_size=37)
    _teach(tmp_path / "c.kdc", RICH, batch_size=50, cluster="local:2")
    arrays = assert_same_arrays(tmp_path / "a.kdc", tmp_path / "b.kdc")
    assert_same_arrays(tmp_path / "a.kdc", tmp_path / "c.kdc")
    assert {"views/partner", "views/mix"} <= set(arrays)


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "m.kdc"
    _teach(out, RICH, views=2)
    return out


def _pixels_by_pair(loader: CachedLoader, epoch: int) -> dict[tuple[int, int], torch.Tensor]:
    loader.set_epoch(epoch)
    order, out = loader.order(epoch), {}
    for step, (x, y, _) in enumerate(loader):
        b = loader.batch_size
        for i, (v, r) in enumerate(zip(order.views[step * b:(step + 1) * b], order.rows[step * b:(step + 1) * b],
                                       strict=True)):
            out[(int(v), int(r))] = (x[i], y[i])
    return out


def test_mixed_views_replay_the_same_pixels_and_targets_whatever_the_batching(mixed_store):
    a = _pixels_by_pair(CachedLoader(mixed_store, 8, loss="kd", view_schedule="random", workers=0), 1)
    b = _pixels_by_pair(CachedLoader(mixed_store, 40, loss="kd", view_schedule="random", workers=2), 1)
    shared = set(a) & set(b)
    assert len(shared) >= 300
    for pair in shared:
        assert torch.equal(a[pair][0], b[pair][0]) and torch.equal(a[pair][1], b[pair][1])
    targets = torch.stack([a[p][1] for p in shared])
    assert targets.shape[1] == 10 and torch.allclose(targets.sum(1), torch.ones(len(shared)))
    assert (targets.max(1).values < 1).float().mean() > 0.3  # most views are mixed: two labels share the mass


def test_mixed_views_are_the_same_pixels_on_one_rank_and_on_two(mixed_store):
    whole = _pixels_by_pair(CachedLoader(mixed_store, 16, loss="kd", view_schedule="random", workers=0), 2)
    shares = {}
    for rank in (0, 1):
        shares |= _pixels_by_pair(CachedLoader(mixed_store, 8, loss="kd", view_schedule="random", workers=0,
                                               rank=rank, world=2), 2)
    assert len(set(whole) & set(shares)) >= 300
    for pair in set(whole) & set(shares):
        assert torch.equal(whole[pair][0], shares[pair][0]) and torch.equal(whole[pair][1], shares[pair][1])


def test_mixed_targets_are_the_pixel_weights_of_row_and_partner(mixed_store):
    loader = CachedLoader(mixed_store, 16, loss="kd", workers=0)
    store = loader.store
    params = store.views()
    labels = np.asarray(store.manifest_column("label"))
    x, y, teacher = next(iter(loader))
    order = loader.order(1)
    views, rows = order.views[:16], order.rows[:16]
    weights = loader.policy.mix_weights({k: v[views, rows] for k, v in params.items()}, loader.size)
    partner = params["partner"][views, rows].astype(np.int64)
    for i in range(16):
        expected = np.zeros(10)
        expected[labels[rows[i]]] += weights[i]
        expected[labels[partner[i]]] += 1 - weights[i]
        if params["mix"][views[i], rows[i]] == 0:
            expected = np.eye(10)[labels[rows[i]]]
        np.testing.assert_allclose(y[i].numpy(), expected, atol=1e-6)
    assert torch.equal(teacher.labels, torch.as_tensor(labels[rows]))  # the record keeps the row's own label
