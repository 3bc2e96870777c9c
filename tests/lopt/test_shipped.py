"""The learned optimizers shipped inside the package load by name, verified, with their
provenance, and train a model without producing non-finite values."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from metaopt.lopt import list_pretrained, load_checkpoint, pretrained
from metaopt.lopt.hub import PRETRAINED_DIR, SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_optimizer_loads_with_provenance_and_steps(name):
    assert name in list_pretrained()
    assert (PRETRAINED_DIR / name / "lopt.json").is_file(), f"{name} is not in the package"
    lopt = pretrained(name)
    again = load_checkpoint(name)
    for (k, a), (_, b) in zip(lopt.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    meta = json.loads((PRETRAINED_DIR / name / "lopt.json").read_text())["metadata"]
    for key in ("command", "config", "seed", "commit", "outer_steps"):
        assert meta.get(key) not in (None, ""), key
    assert meta["config"]["experiment"] == "lopt_metatrain"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = lopt.optimizer(model.parameters(), num_steps=50)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
