"""A teacher for tests/test_teach.py whose logits overflow float16 (spec ``huge_logits_teacher:make``).

The overflow is found only when the first block is encoded, after the store was created: the run must
still leave no store behind."""

from __future__ import annotations

from torch import nn

from kdcache.models import build_model


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale + 1e5


def make(num_classes: int = 10) -> nn.Module:
    return Scaled(build_model("tiny_cnn", num_classes, seed=3), 1e6)
