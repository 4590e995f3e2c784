"""Train a student from a kdcache store in a plain PyTorch loop, with public kdcache names only.

    python examples/own_loop.py runs/digits.kdc --student small_cnn --epochs 2 --out student.pt

With the same seed and settings it trains the same student as
`kdcache train STORE --student small_cnn --loss kd --milestones 1000 ...` (tests/test_api_loader.py).
"""

import argparse

import torch

import kdcache

p = argparse.ArgumentParser(description="KD from a kdcache store in your own loop")
p.add_argument("store")
p.add_argument("--student", default="small_cnn")
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="student.pt")
args = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
store = kdcache.open_store(args.store)
loader = kdcache.CachedLoader(store, batch_size=args.batch_size, seed=args.seed, loss="kd", max_steps=args.max_steps)
model = kdcache.build_model(args.student, store.num_classes, seed=args.seed).to(device)
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
for epoch in range(1, args.epochs + 1):
    loader.set_epoch(epoch)
    model.train()
    for images, labels, teacher in loader:  # the cached views, their labels, the teacher's record
        images, labels = images.to(device), labels.to(device)
        loss = kdcache.losses.kd(model(images), teacher.to(device), labels)  # T=4, w_ce=0.1, w_kd=0.9
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"epoch {epoch}: loss {loss.item():.4f}")
torch.save(model.state_dict(), args.out)
