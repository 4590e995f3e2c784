"""Stage one and verify from Python (``kdcache.teach.teach``, ``kdcache.verify.verify``): real zarr stores on tmp
dirs, real torch modules, and the store the CLI writes as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_arrays, store_arrays
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.data import as_image_dataset
from kdcache.models import build_model
from kdcache.stores.errors import CorruptionError, KdcacheError, SpecError, StoreError
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, teach
from kdcache.verify import verify

runner = CliRunner()
SPEC = "kdcache.models:small_cnn"
SMALL = {"split": "test", "k": 5, "views": 2, "view_policy": "crop-flip", "shard_rows": 128, "chunk_rows": 64,
         "batch_size": 50}
FAST = {"k": 3, "shard_rows": 16, "chunk_rows": 8, "batch_size": 8, "workers": 0, "progress": False}


def cli_store(out: Path, *extra: str) -> LogitStore:
    res = runner.invoke(app, ["teach", "digits", "--teacher", SPEC, "--split", "test", "--views", "2",
                              "--view-policy", "crop-flip", "--shard-rows", "128", "--chunk-rows", "64",
                              "--batch-size", "50", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return LogitStore.open(str(out))


class TinyNet(nn.Module):
    """A linear teacher over 10x10 RGB images; ``fail_after`` forwards it raises (a killed run)."""

    def __init__(self, seed: int = 0, classes: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3 * 10 * 10, classes)
        self.fail_after: int | None = None

    def forward(self, x):
        if self.fail_after is not None:
            if self.fail_after == 0:
                raise RuntimeError("killed mid-run")
            self.fail_after -= 1
        return self.fc(x.flatten(1))


class Items:
    """A user map-style dataset: ``kind`` "pil" (grey PIL images) or "tensor" (uint8 3x10x10 of the same
    pixels); ``targets=True`` exposes the labels as an attribute; ``bad`` replaces item ``bad_index``."""

    def __init__(self, n: int = 40, kind: str = "pil", seed: int = 0, targets: bool = False, bad=None,
                 bad_index: int = 0):
        rng = np.random.default_rng(seed)
        self.pixels = rng.integers(0, 256, (n, 10, 10), dtype=np.uint8)
        self.y = rng.integers(0, 5, n)
        self.kind, self.bad, self.bad_index = kind, bad, bad_index
        if targets:
            self.targets = self.y.tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.bad is not None and i == self.bad_index:
            return self.bad
        if self.kind == "pil":
            return Image.fromarray(self.pixels[i]), int(self.y[i])
        return torch.from_numpy(self.pixels[i]).expand(3, -1, -1).clone(), int(self.y[i])


def test_teach_from_a_spec_writes_the_cli_store(tmp_path):
    cli = cli_store(tmp_path / "cli.kdc", "--k", "5")
    api = teach("digits", [SPEC], tmp_path / "api.kdc", progress=False, **SMALL)
    assert isinstance(api, LogitStore) and api.done("small_cnn").all()
    assert_same_arrays(tmp_path / "cli.kdc", tmp_path / "api.kdc")
    assert api.attrs["identity"] == cli.attrs["identity"]
    assert api.teacher_attrs("small_cnn")["identity"] == cli.teacher_attrs("small_cnn")["identity"]


STORE_IDENTITY = [["dataset", "digits"], ["split", "test"], ["views", 2], ["view_policy", "crop-flip"],
                  ["image_size", None], ["seed", 0], ["shard_rows", 128], ["chunk_rows", 64]]
LOCA = [["correction", "loca"], ["correction_args", {"alpha": 0.9, "temperature": 4.0}]]
TEACHER_IDENTITY = {
    "5": [["spec", SPEC], ["k", 5], ["encoding", "float16"], ["temperatures", [1.0, 4.0]], *LOCA],
    "sampled:4": [["spec", SPEC], ["k", "sampled:4"], ["encoding", "float16"], ["temperatures", [1.0, 4.0]], *LOCA,
                  ["proposal_temperature", 4.0]],
}


def as_items(d: dict) -> list:
    return json.loads(json.dumps(list(d.items())))


@pytest.mark.parametrize("k", sorted(TEACHER_IDENTITY))
def test_identity_attrs_are_pinned(tmp_path, k):
    """Stores in use resume only if the identity dicts keep their keys, values and order."""
    store = cli_store(tmp_path / "s.kdc", "--k", k, "--correction", "loca")
    assert as_items(store.attrs["identity"]) == STORE_IDENTITY
    assert as_items(store.teacher_attrs("small_cnn")["identity"]) == TEACHER_IDENTITY[k]
    cfg = TeachConfig(dataset="digits", teachers=[SPEC], out="x", split="test", k=int(k) if k.isdigit() else k,
                      views=2, view_policy="crop-flip",
                      shard_rows=128, chunk_rows=64, correction="loca",
                      proposal_temperature=4.0 if k.startswith("sampled") else None)
    assert as_items(cfg.store_identity()) == STORE_IDENTITY
    assert as_items(cfg.teacher_identity(SPEC)) == TEACHER_IDENTITY[k]


def test_auto_identity_records_the_budget():
    cfg = TeachConfig(dataset="digits", teachers=[SPEC], out="x", k="auto", max_kl=0.01)
    assert list(cfg.teacher_identity(SPEC)) == ["spec", "k", "encoding", "temperatures", "correction",
                                                "correction_args", "max_kl"]
    assert cfg.teacher_identity(SPEC)["max_kl"] == 0.01


def test_teach_a_user_dataset_of_pil_images_and_of_tensors(tmp_path):
    net = TinyNet()
    pil = teach(Items(kind="pil"), {"tiny": net}, tmp_path / "pil.kdc", **FAST)
    teach(Items(kind="tensor"), {"tiny": net}, tmp_path / "tensor.kdc", **FAST)
    assert pil.teachers == ["tiny"] and pil.done("tiny").all()
    assert pil.attrs["dataset"]["spec"] == "python:Items" and pil.teacher_attrs("tiny")["spec"] == "python:TinyNet"
    assert pil.attrs["input_size"] == [10, 10]
    # grey PIL images become the same RGB tensors: same store
    assert_same_arrays(tmp_path / "pil.kdc", tmp_path / "tensor.kdc")
    # the cached records are the module's own logits on the (identity-view, normalised) images
    ds = as_image_dataset(Items(kind="pil"))
    index = pil.manifest_column("dataset_index")
    x = torch.stack([ds.image(int(i)) for i in index]).float() / 255
    x = (x - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    with torch.no_grad():
        top = net(x).topk(3, dim=1)
    rec = pil.read_block("tiny", 0, 0, pil.num_rows)
    np.testing.assert_array_equal(rec["indices"], top.indices.numpy())
    np.testing.assert_allclose(rec["values"], top.values.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(pil.labels(), Items().y[index])


def test_adapter_reads_labels_from_targets_and_handles_mixed_sizes():
    class Mixed(Items):
        def __getitem__(self, i):
            image, label = super().__getitem__(i)
            return (image.resize((12, 10)) if i % 2 else image), label

    mixed = as_image_dataset(Mixed(n=6))
    assert mixed.image_size is None
    assert mixed.image_sizes().tolist() == [[10, 10], [10, 12]] * 3
    same = as_image_dataset(Items(n=6, targets=True), num_classes=7, mean=0.5, std=(0.25,))
    assert same.image_size == (10, 10) and same.num_classes == 7 and same.sample_ids[:2] == ["0", "1"]
    assert same.mean == (0.5,) * 3 and same.std == (0.25,) * 3
    np.testing.assert_array_equal(same.labels, Items(n=6).y)


def test_fingerprint_hashes_the_documented_sample():
    ds = as_image_dataset(Items(n=1000, targets=True))
    sample = ds.fingerprint_indices()
    assert len(sample) == 66 and sample[0] == 0 and sample[-1] == 999
    outside = int(np.setdiff1d(np.arange(1000), sample)[0])
    for index, changes in ((outside, False), (int(sample[10]), True), (999, True)):
        other = Items(n=1000, targets=True)
        other.pixels[index] ^= 1
        assert (as_image_dataset(other).fingerprint() != ds.fingerprint()) is changes, index


def test_resume_after_a_killed_run_with_the_same_module(tmp_path):
    teach(Items(), {"tiny": TinyNet()}, tmp_path / "ref.kdc", **FAST)
    net = TinyNet()
    net.fail_after = 4  # the head check, then three batches: the first block (2 batches) is done
    with pytest.raises(RuntimeError, match="killed"):
        teach(Items(), {"tiny": net}, tmp_path / "s.kdc", **FAST)
    partial = LogitStore.open(str(tmp_path / "s.kdc")).done("tiny")
    assert 0 < partial.sum() < partial.size
    net.fail_after = None
    teach(Items(), {"tiny": net}, tmp_path / "s.kdc", **FAST)
    assert_same_arrays(tmp_path / "ref.kdc", tmp_path / "s.kdc")


def test_resume_with_other_weights_or_other_data_is_refused(tmp_path):
    out = tmp_path / "s.kdc"
    teach(Items(), {"tiny": TinyNet()}, out, **FAST)
    before = store_arrays(out)
    with pytest.raises(StoreError, match="other weights"):
        teach(Items(), {"tiny": TinyNet(seed=1)}, out, **FAST)
    other = Items()
    other.pixels[7, 3, 3] ^= 0xFF
    with pytest.raises(StoreError, match="different data"):
        teach(other, {"tiny": TinyNet()}, out, **FAST)
    after = store_arrays(out)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    teach(other, {"tiny": TinyNet(seed=1)}, out, overwrite=True, **FAST)  # overwrite replaces it
    assert LogitStore.open(str(out)).attrs["dataset"]["fingerprint"] == as_image_dataset(other).fingerprint()


def test_verify_a_good_store_and_a_flipped_byte(tmp_path):
    out = tmp_path / "s.kdc"
    teach("digits", [SPEC], out, progress=False, **SMALL)
    report = verify(out, teacher=SPEC, samples=16)
    assert report.ok and report.problems == [] and report.blocks_done == {"small_cnn": (6, 6)}
    assert len(report.replays) == 1 and report.replays[0].samples == 16 and report.replays[0].top1_agreement == 1.0
    report.raise_for_problems()
    res = runner.invoke(app, ["verify", str(out), "--teacher", SPEC, "--samples", "16"])
    assert res.exit_code == 0, res.output
    assert "ok: teacher small_cnn: 6/6 blocks done, checksums match" in res.output
    assert "replay small_cnn: 16 samples" in res.output and "top-1 agreement 100.0%" in res.output

    chunk = sorted(p for p in (out / "teachers" / "small_cnn" / "values").rglob("*")
                   if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify(str(out), teacher=SPEC)
    assert not report.ok and len(report.problems) == 1 and report.replays == []
    assert report.problems[0].startswith("view ") and "teacher small_cnn" in report.problems[0]
    with pytest.raises(CorruptionError, match=r"^1 problem\(s\) in ") as err:
        report.raise_for_problems()
    assert "\n" not in str(err.value)


def test_verify_finds_a_cache_that_other_weights_do_not_reproduce(tmp_path):
    out = tmp_path / "s.kdc"
    teach("digits", [SPEC], out, progress=False, **SMALL)
    weights = tmp_path / "other.pt"
    torch.save(build_model("small_cnn", 10, seed=3).state_dict(), weights)
    report = verify(out, teacher=[f"small_cnn@{weights}"], samples=8)  # same store name, other weights
    assert report.problems == [] and not report.ok and not report.replays[0].ok
    with pytest.raises(CorruptionError, match="does not reproduce teacher 'small_cnn'"):
        report.raise_for_problems()


BAD = {
    "no teachers": (lambda: (Items(), []), {}, "no teacher"),
    "not a module": (lambda: (Items(), {"x": object()}), {}, "nn.Module"),
    "not a pair": (lambda: (Items(bad="oops"), {"t": TinyNet()}), {}, "item 0"),
    "numpy image": (lambda: (Items(bad=(np.zeros((10, 10), np.uint8), 1)), {"t": TinyNet()}), {}, "PIL image"),
    "float image": (lambda: (Items(bad=(torch.zeros(3, 10, 10), 1)), {"t": TinyNet()}), {}, "ToTensor"),
    "four channels": (lambda: (Items(bad=(torch.zeros(4, 10, 10, dtype=torch.uint8), 1), bad_index=5),
                               {"t": TinyNet()}), {}, "item 5"),
    "float label": (lambda: (Items(bad=(Image.new("L", (10, 10)), 1.5), bad_index=3), {"t": TinyNet()}), {},
                    "label"),
    # labels from the targets attribute: the bad image is found while labelling, before any block is done
    "bad item found late": (lambda: (Items(targets=True, bad=(torch.zeros(2, 10, 10, dtype=torch.uint8), 1),
                                           bad_index=3), {"t": TinyNet()}), {}, "item 3"),
    "unknown option": (lambda: (Items(), {"t": TinyNet()}), {"kk": 3}, "did you mean 'k'"),
    "dask with objects": (lambda: (Items(), {"t": TinyNet()}), {"cluster": "local:1"}, "dask"),
    "wrong head": (lambda: (Items(), {"t": TinyNet(classes=3)}), {}, "classes"),
    "spec under another name": (lambda: ("digits", {"mine": SPEC}), {}, "small_cnn"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_no_store(tmp_path, case):
    make, extra, needle = BAD[case]
    dataset, teachers = make()
    out = tmp_path / "bad.kdc"
    with pytest.raises(KdcacheError) as err:
        teach(dataset, teachers, out, **{**FAST, **extra})
    message = str(err.value)
    assert needle in message and "\n" not in message, message
    assert not out.exists()


def test_unknown_option_is_a_spec_error_with_the_options_listed(tmp_path):
    with pytest.raises(SpecError, match="expected one of split, k, encoding"):
        teach("digits", [SPEC], tmp_path / "x.kdc", zzzzzz=1)
