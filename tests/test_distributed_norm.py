"""DDP on this CPU (2 gloo processes): ranks with batch B equal one process with batch 2B.

A dn* model needs no communication; a bn model does, through ``sync_batch``; without it the
two runs differ (the control that shows the comparison can fail).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lit_divnorm.norm import DivisiveNorm, build_norm, sparsity_penalty

WORLD = 2
CASES = [("dn*", False), ("bn*", True), ("bn", False)]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        build_norm(norm, 4, layer_window=3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=generator), torch.randint(
        0, 5, (8,), generator=generator
    )


def _step(model: nn.Module, forward: nn.Module, x, y) -> torch.Tensor:
    loss = F.cross_entropy(forward(x), y) + sparsity_penalty(model)
    loss.backward()
    return loss.detach()


def _result(model: nn.Module, loss: torch.Tensor) -> dict:
    norm = model[1]
    return {
        "loss": loss,
        "grads": [p.grad.clone() for p in model.parameters()],
        "running_mean": None if norm.running_mean is None else norm.running_mean.clone(),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, y = _data()
    results = {}
    for norm, sync in CASES:
        model = _model(norm)
        for module in model.modules():
            if isinstance(module, DivisiveNorm):
                module.sync_batch = sync
        ddp = DistributedDataParallel(model)
        loss = _step(model, ddp, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        dist.all_reduce(loss)
        results[(norm, sync)] = _result(model, loss / WORLD)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return torch.load(Path(out) / "ddp.pt")


def _single(norm: str) -> dict:
    model = _model(norm)
    x, y = _data()
    return _result(model, _step(model, model, x, y))


def _assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-5, rtol=1e-5)
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
    if a["running_mean"] is not None:
        torch.testing.assert_close(a["running_mean"], b["running_mean"], atol=1e-6, rtol=1e-5)


def test_dn_star_ddp_equals_one_process_with_the_whole_batch(ddp_results):
    _assert_same(ddp_results[("dn*", False)], _single("dn*"))


def test_synchronized_bn_ddp_equals_one_process_with_the_whole_batch(ddp_results):
    _assert_same(ddp_results[("bn*", True)], _single("bn*"))


def test_unsynchronized_bn_differs(ddp_results):
    with pytest.raises(AssertionError):
        _assert_same(ddp_results[("bn", False)], _single("bn"))
