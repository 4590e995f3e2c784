"""Linked views (view groups): a store holds named groups of views per row; stage two serves every group
of a row in the same step, each with its own teacher record, and SLD trains in its official two-view form."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TEACHER, cli, teach

import kdcache
from kdcache.loader import CachedLoader
from kdcache.losses import sld
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError
from kdcache.train import step_loss
from kdcache.views import view_groups

GROUPS = (("weak", "crop-flip"), ("strong", "crop-flip | rrc-flip:scale=0.3..1"))
VIEWS = 2


@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("groups") / "g.kdc"
    kdcache.teach("digits", teachers=[TEACHER], out=str(out), split="test", k="all", views=VIEWS,
                  view_groups=GROUPS, shard_rows=128, chunk_rows=64, device="cpu", progress=False)
    return out


def test_groups_sample_their_own_views_independently():
    groups = view_groups(list(GROUPS))
    params = groups.sample(3, 40, (8, 8), seed=5)
    assert groups.groups == {"weak": range(0, 3), "strong": range(3, 6)}
    assert params["group"][:, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert (params["group"] == params["group"][:, :1]).all()
    assert not params["strong.1-rrc-flip.height"][:3].any() and params["strong.1-rrc-flip.height"][3:].all()
    assert not params["weak.dy"][3:].any()
    # the strong group's crop offsets are drawn independently of the weak group's
    assert not np.array_equal(params["weak.dy"][:3], params["strong.0-crop-flip.dy"][3:])
    again = view_groups(list(GROUPS)).sample(3, 40, (8, 8), seed=5)
    assert all(np.array_equal(params[k], again[k]) for k in params)


def test_every_step_serves_each_group_of_the_same_rows_with_its_own_record(grouped_store):
    store = kdcache.open_store(grouped_store).logit_store
    assert store.num_views == 2 * VIEWS
    loader = CachedLoader(grouped_store, 32, loss="kd", view_schedule="random", seed=3)
    order = loader.order(1)
    for step, (x, y, teacher) in enumerate(loader):
        assert set(x) == set(y) == set(teacher) == {"weak", "strong"}
        rows = order.rows[step * 32:(step + 1) * 32]
        slots = order.views[step * 32:(step + 1) * 32]
        assert torch.equal(y["weak"], y["strong"])
        for g, offset in (("weak", 0), ("strong", VIEWS)):
            expected = loader.rows.__getitems__(np.stack([slots + offset, rows], axis=1))
            assert torch.equal(x[g], expected.images)
            record = teacher[g]
            for view in np.unique(slots):
                at = np.flatnonzero(slots == view)
                stored = store.read_block("resnet18", int(view) + offset, 0, store.num_rows)
                want = torch.as_tensor(stored["values"][rows[at]]).float()
                assert torch.equal(record.logits()[torch.as_tensor(at)].float(), want)  # dense: class order
        if step == 2:
            break
    assert not torch.equal(x["weak"], x["strong"])


def test_verify_replays_every_view_of_every_group(grouped_store):
    report = kdcache.verify(str(grouped_store), teacher=TEACHER, samples=64)
    assert report.ok, report.problems
    assert report.replays[0].top1_agreement == 1.0 and report.replays[0].max_abs_diff < 1e-3


def test_ranks_take_disjoint_shares_of_the_same_linked_pairs(grouped_store):
    whole = CachedLoader(grouped_store, 8, loss="kd", view_schedule="random", records=False)
    seen = []
    for rank in (0, 1):
        share = CachedLoader(grouped_store, 4, loss="kd", view_schedule="random", records=False, rank=rank, world=2)
        order = share.order(2)
        seen += list(zip(order.views.tolist(), order.rows.tolist(), strict=True))
    full = whole.order(2)
    assert sorted(seen) == sorted(zip(full.views.tolist(), full.rows.tolist(), strict=True))


def _swap(z, y):
    """SLD.py's swap, written out: exchange the label's logit and the max logit."""
    z = z.clone()
    m = z.argmax(1)
    rows = torch.arange(len(z))
    z_y, z_m = z[rows, y].clone(), z[rows, m].clone()
    z[rows, m], z[rows, y] = z_y, z_m
    return z


def _official_two_view_sld(s_weak, s_strong, t_weak, t_strong, y, epoch, w_ce=0.1, w_kd=0.9):
    """A transcription of SLD.forward_train (StephenEkaputra/Swapped-Logit-Distillation,
    mdistiller/distillers/SLD.py): CE on both views, swapped-teacher and (after epoch 150) swapped-student
    KD at T = 1..6 on both views, all summed."""
    def kd_loss(student, teacher, temperature):
        log_pred = F.log_softmax(student / temperature, dim=1)
        pred = F.softmax(teacher / temperature, dim=1)
        return F.kl_div(log_pred, pred, reduction="none").sum(1).mean() * temperature**2

    loss = w_ce * (F.cross_entropy(s_weak, y) + F.cross_entropy(s_strong, y))
    for s, t in ((s_weak, t_weak), (s_strong, t_strong)):
        for temperature in (1, 2, 3, 4, 5, 6):
            loss = loss + w_kd * kd_loss(s, _swap(t, y), temperature)
            if epoch > 150:
                loss = loss + w_kd * kd_loss(s, _swap(s, y), temperature)
    return loss


@pytest.mark.parametrize("epoch", [1, 151])
def test_two_view_sld_equals_the_official_formula_in_float64(epoch):
    gen = torch.Generator().manual_seed(epoch)
    b, c = 16, 10
    y = torch.randint(0, c, (b,), generator=gen)
    s_weak, s_strong = (torch.randn(b, c, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    t_weak, t_strong = (3 * torch.randn(b, c, generator=gen, dtype=torch.float64) for _ in range(2))
    ours = sum(sld(s, SparseLogits.from_dense(t, y, c, temperatures=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)), y, epoch=epoch)
               for s, t in ((s_weak, t_weak), (s_strong, t_strong)))
    official = _official_two_view_sld(s_weak, s_strong, t_weak, t_strong, y, epoch)
    assert torch.allclose(ours, official, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours, (s_weak, s_strong), retain_graph=True)
    g_official = torch.autograd.grad(official, (s_weak, s_strong))
    for a, b_ in zip(g_ours, g_official, strict=True):
        assert torch.allclose(a, b_, rtol=1e-10, atol=1e-14)


def test_the_trainer_sums_the_loss_over_groups_with_one_forward_each():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    run = SimpleNamespace(ranks=SimpleNamespace(device=torch.device("cpu")), online=None, step_model=model, hp={})
    y = torch.randint(0, 5, (6,))
    x = {"weak": torch.randn(6, 3, 2, 2), "strong": torch.randn(6, 3, 2, 2)}
    t = {g: SparseLogits.from_dense(torch.randn(6, 5), y, 5, temperatures=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)) for g in x}
    loss, logits, labels = step_loss(run, sld, 1, torch.autocast("cpu", enabled=False), x, {g: y for g in x}, t)
    expected = sum(sld(model(x[g]), t[g], y) for g in x)
    assert calls[:2] == [6, 6]
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.equal(logits, model(x["weak"])) and torch.equal(labels, y)


def test_kdcache_train_sld_on_both_views_and_with_a_live_teacher(grouped_store, tmp_path):
    for extra, out in (((), "cached"), (("--online-teacher", TEACHER), "live")):
        res = cli("train", grouped_store, "--student", "small_cnn", "--loss", "sld", "--epochs", "1",
                  "--max-steps-per-epoch", "3", "--batch-size", "16", "--device", "cpu", "--out", tmp_path / out,
                  *extra)
        assert res.exit_code == 0, res.output
        assert (tmp_path / out / "student.pt").exists()


@pytest.mark.parametrize("args, match", [
    (("--view-group", "weak"), "NAME=POLICY"),
    (("--view-group", "weak=crop-flip"), "at least two groups"),
    (("--view-group", "a=crop-flip", "--view-group", "a=rrc-flip"), "must differ"),
    (("--view-group", "a=crop-flip", "--view-group", "b=crop-flip", "--view-policy", "crop-flip"), "not both"),
    (("--view-group", "a=crop-flip", "--view-group", "b=crop-flip | nosuch"), "unknown op 'nosuch'"),
])
def test_bad_view_groups_are_one_line_and_leave_no_store(args, match, tmp_path):
    out = tmp_path / "bad.kdc"
    res = teach("digits", "--split", "test", "--teacher", TEACHER, "--out", out, *args)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0], res.output
    assert not out.exists()


def test_groups_need_two_and_distinct_names():
    with pytest.raises(SpecError, match="at least two"):
        view_groups([("weak", "crop-flip")])
