"""Distil into a timm student from a kdcache store (needs `pip install kdcache[timm]`).

    python examples/timm_student.py runs/digits.kdc --model resnet10t --epochs 1 --out student.pt

The teacher is never loaded: the loader serves the cached views and the teacher's record, and the
loss is DKD (Zhao et al. 2022) at its CIFAR-100 settings from kdcache's loss registry.
"""

import argparse

import timm
import torch

import kdcache

p = argparse.ArgumentParser(description="DKD into a timm student from a kdcache store")
p.add_argument("store")
p.add_argument("--model", default="resnet10t", help="any timm architecture (random init)")
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--max-steps", type=int, default=None)
p.add_argument("--out", default="student.pt")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
store = kdcache.open_store(args.store)
loader = kdcache.CachedLoader(store, batch_size=args.batch_size, loss="dkd", max_steps=args.max_steps)
model = timm.create_model(args.model, pretrained=False, num_classes=store.num_classes).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
dkd = kdcache.get_loss("dkd")
for epoch in range(1, args.epochs + 1):
    loader.set_epoch(epoch)
    model.train()
    for images, labels, teacher in loader:
        images, labels = images.to(device), labels.to(device)
        loss = dkd.fn(model(images), teacher.to(device), labels, epoch=epoch, **dkd.defaults)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
torch.save(model.state_dict(), args.out)
