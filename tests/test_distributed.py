"""TrAct under DDP and FSDP2: two gloo processes on CPU against single-process references.

One spawn runs every distributed scenario (process start-up dominates the cost); the tests then
compare what each rank ended with against

* the library in a single process on the concatenated global batch, and
* a hand-written simulation of data parallelism: one model copy per rank, gradients averaged as
  DDP does, the first layers preconditioned by ``tract_grad`` (float64, no library
  code) with either the global batch's rows (synchronised statistics) or the rank's own rows (the
  authors' behaviour), then plain ``torch.optim.SGD``.

The model has two first layers (an image convolution and a token ``Linear``), so every scenario
also checks that both layers' statistics travel in one collective. Configurations give FSDP2
uneven shards, an empty shard, and shards that start or end inside a convolution group, with the
first layers sharded by their own ``fully_shard`` or only through the root's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from tests.kit import TwoStem, max_abs_diff, run_workers, stacked_rows, tract_grad, two_stem
from tract_optim import TrActOptimizer

pytestmark = pytest.mark.slow

WORLD = 2
PER_RANK = 2
SIZE = 6
TOKENS, TOKEN_DIM = 3, 8  # 6 token rows per rank < 8: the Woodbury form locally
CLASSES = 3
LAMS = (0.1, 0.05)  # conv, Linear
LR, MOMENTUM = 0.2, 0.9
STEPS = 3
# fp32 library vs fp64 reference after a few steps; measured differences are at most 3e-7.
ATOL = 2e-5

Batch = tuple[Tensor, Tensor, Tensor]
Params = dict[str, Tensor]


@dataclass(frozen=True)
class Config:
    """The two first layers' shapes."""

    in_channels: int
    out_channels: int
    groups: int
    stride: int
    lin_out: int


CONFIGS = {
    # FSDP2 on 2 ranks: conv rows 2 + 1 (uneven), Linear rows 1 + 0 (an empty shard).
    "uneven": Config(in_channels=2, out_channels=3, groups=1, stride=1, lin_out=1),
    # 3 groups of 2 output channels, shards of 3 rows: each shard holds half of group 1.
    "groups": Config(in_channels=3, out_channels=6, groups=3, stride=2, lin_out=5),
}
# Local shapes FSDP2 must produce for the configurations above (rows on rank 0, rank 1).
SHARD_ROWS = {"uneven": {"conv": (2, 1), "lin": (1, 0)}, "groups": {"conv": (3, 3), "lin": (3, 2)}}


def make_model(cfg: Config) -> TwoStem:
    """The same initial model in every process."""
    return two_stem(
        channels=cfg.in_channels,
        width=cfg.out_channels,
        stride=cfg.stride,
        groups=cfg.groups,
        token_dim=TOKEN_DIM,
        lin_out=cfg.lin_out,
        classes=CLASSES,
    )


def batch(cfg: Config, step: int, rank: int, micro: int = 0) -> Batch:
    """Rank ``rank``'s slice of the global batch; ranks see differently scaled data."""
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    image = torch.randn(PER_RANK, cfg.in_channels, SIZE, SIZE, generator=gen) * (1 + rank)
    tokens = torch.randn(PER_RANK, TOKENS, TOKEN_DIM, generator=gen) + rank
    labels = torch.randint(0, CLASSES, (PER_RANK,), generator=gen)
    return image, tokens, labels


def loss_of(model: nn.Module, b: Batch) -> Tensor:
    image, tokens, labels = b
    return F.cross_entropy(model(image, tokens), labels)


def make_optimizer(model: TwoStem, **kwargs: Any) -> TrActOptimizer:
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return TrActOptimizer(sgd, [model.conv, model.lin], lam=list(LAMS), **kwargs)


def step_counting_collectives(opt: TrActOptimizer) -> int:
    """``opt.step()``; returns how many all-reduces it issued."""
    with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as spy:
        opt.step()
    return spy.call_count


# --- what each rank runs ------------------------------------------------------------------------


def run_ddp(
    cfg: Config,
    rank: int,
    *,
    steps: int = STEPS,
    micro: int = 1,
    bucket_view: bool = False,
    compiled: bool = False,
    **tract: Any,
) -> dict[str, Any]:
    """Train under DDP; ``micro`` > 1 accumulates micro-batches under ``no_sync``."""
    model = make_model(cfg)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = make_optimizer(model, **tract)
    forward = torch.compile(ddp, backend="aot_eager") if compiled else ddp
    collectives = []
    for step in range(steps):
        opt.zero_grad()
        for m in range(micro):
            sync = m == micro - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                (loss_of(forward, batch(cfg, step, rank, m)) / micro).backward()
        collectives.append(step_counting_collectives(opt))
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"params": params, "collectives": collectives}


def run_fsdp2(
    cfg: Config,
    rank: int,
    *,
    shard_layers: bool,
    tract_first: bool = False,
    steps: int = STEPS,
    **tract: Any,
) -> dict[str, Any]:
    """Train under ``fully_shard``: of each first layer and the root, or of the root only.
    ``tract_first``: the optimizer is built before sharding and then re-pointed at the sharded
    parameters, as ``accelerate.prepare(model, optimizer)`` does under FSDP2."""
    model = make_model(cfg)
    if tract_first:
        opt = make_optimizer(model, **tract)
    if shard_layers:
        fully_shard(model.conv)
        fully_shard(model.lin)
    fully_shard(model)
    if tract_first:
        opt.param_groups[0]["params"] = list(model.parameters())
    else:
        opt = make_optimizer(model, **tract)
    collectives = []
    rows: dict[str, int] = {}
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, batch(cfg, step, rank)).backward()
        for name in ("conv", "lin"):
            grad = getattr(model, name).weight.grad
            rows[name] = grad.to_local().shape[0]
        collectives.append(step_counting_collectives(opt))
    params = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return {"params": params, "collectives": collectives, "rows": rows}


def worker(rank: int, world: int) -> dict[str, Any]:
    """Every scenario, in one process group."""
    assert world == WORLD
    out: dict[str, Any] = {}
    for name, cfg in CONFIGS.items():
        out[f"ddp/{name}"] = run_ddp(cfg, rank, bucket_view=name == "uneven")
        out[f"fsdp2/{name}"] = run_fsdp2(cfg, rank, shard_layers=name == "uneven")
    cfg = CONFIGS["groups"]
    out["ddp-local"] = run_ddp(cfg, rank, steps=2, sync_statistics=False)
    own = [dist.new_group([r]) for r in range(world)][rank]
    out["ddp-own-group"] = run_ddp(cfg, rank, steps=2, process_group=own)
    out["ddp-no-sync"] = run_ddp(cfg, rank, micro=2)
    out["ddp-compiled"] = run_ddp(cfg, rank, compiled=True)
    out["fsdp2-tract-first"] = run_fsdp2(cfg, rank, shard_layers=False, tract_first=True)
    out["ddp-every2"] = run_ddp(cfg, rank, steps=4, stats_every=2)
    out["fsdp2-every2"] = run_fsdp2(cfg, rank, shard_layers=True, steps=4, stats_every=2)
    return out


# --- references, in this process ----------------------------------------------------------------


def single_process(cfg: Config, steps: int = STEPS, micro: int = 1) -> Params:
    """The library without torch.distributed, on every rank's micro-batches concatenated."""
    model = make_model(cfg)
    opt = make_optimizer(model)
    for step in range(steps):
        parts = [batch(cfg, step, r, m) for r in range(WORLD) for m in range(micro)]
        images, tokens, labels = (torch.cat(p) for p in zip(*parts, strict=True))
        opt.zero_grad()
        loss_of(model, (images, tokens, labels)).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def simulated(cfg: Config, *, sync: bool, steps: int = STEPS, micro: int = 1) -> list[Params]:
    """Data parallelism by hand: per-rank models, averaged gradients, reference TrAct, SGD."""
    models = [make_model(cfg) for _ in range(WORLD)]
    sgds = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in models]
    for step in range(steps):
        seen = [[batch(cfg, step, r, m) for m in range(micro)] for r in range(WORLD)]
        for model, batches in zip(models, seen, strict=True):
            model.zero_grad()
            for b in batches:
                (loss_of(model, b) / micro).backward()
        names = [k for k, _ in models[0].named_parameters()]
        mean = {k: torch.stack([m.get_parameter(k).grad for m in models]).mean(0) for k in names}
        for rank, (model, sgd) in enumerate(zip(models, sgds, strict=True)):
            for k, p in model.named_parameters():
                p.grad = mean[k].clone()
            visible = [b for r in range(WORLD) if sync or r == rank for b in seen[r]]
            for layer, lam, index in ((model.conv, LAMS[0], 0), (model.lin, LAMS[1], 1)):
                rows = stacked_rows(layer, [b[index] for b in visible])
                grad = layer.weight.grad
                layer.weight.grad = tract_grad(rows, grad, lam).float()
            sgd.step()
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_workers(worker, WORLD, timeout=180)


def assert_close(a: Params, b: Params, atol: float = ATOL) -> None:
    diff = max_abs_diff(a, b)
    assert diff < atol, f"largest parameter difference {diff:.3g} ≥ {atol}"


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ddp_replicas_match_single_process_on_global_batch(
    results: list[dict[str, Any]], name: str
) -> None:
    cfg = CONFIGS[name]
    single = single_process(cfg)
    by_hand = simulated(cfg, sync=True)
    for rank, res in enumerate(results):
        params = res[f"ddp/{name}"]["params"]
        assert_close(params, single)
        assert_close(params, by_hand[rank])
    first, second = (res[f"ddp/{name}"]["params"] for res in results)
    assert all(torch.equal(first[k], second[k]) for k in first), "replicas drifted apart"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_matches_ddp_with_uneven_and_empty_shards(
    results: list[dict[str, Any]], name: str
) -> None:
    by_hand = simulated(CONFIGS[name], sync=True)
    for rank, res in enumerate(results):
        assert_close(res[f"fsdp2/{name}"]["params"], res[f"ddp/{name}"]["params"])
        assert_close(res[f"fsdp2/{name}"]["params"], by_hand[rank])
        for layer, rows in SHARD_ROWS[name].items():
            assert res[f"fsdp2/{name}"]["rows"][layer] == rows[rank]


def test_all_layers_share_one_collective_per_step(results: list[dict[str, Any]]) -> None:
    for res in results:
        for name in CONFIGS:
            assert res[f"ddp/{name}"]["collectives"] == [1] * STEPS
            assert res[f"fsdp2/{name}"]["collectives"] == [1] * STEPS
        assert res["ddp-no-sync"]["collectives"] == [1] * STEPS
        assert res["ddp-local"]["collectives"] == [0, 0]


def test_local_statistics_are_per_rank_tract(results: list[dict[str, Any]]) -> None:
    cfg = CONFIGS["groups"]
    local = simulated(cfg, sync=False, steps=2)
    synced = simulated(cfg, sync=True, steps=2)
    for rank, res in enumerate(results):
        assert_close(res["ddp-local"]["params"], local[rank])
        assert max_abs_diff(res["ddp-local"]["params"], synced[rank]) > 1e-3
    assert max_abs_diff(results[0]["ddp-local"]["params"], results[1]["ddp-local"]["params"]) > 1e-3


def test_process_group_argument_selects_whose_statistics_are_summed(
    results: list[dict[str, Any]],
) -> None:
    # A group holding only this rank: nothing to sum with, so exactly the local behaviour.
    for res in results:
        assert_close(res["ddp-own-group"]["params"], res["ddp-local"]["params"], atol=1e-7)
        assert res["ddp-own-group"]["collectives"] == [0, 0]


def test_no_sync_gradient_accumulation_matches_global_batch(results: list[dict[str, Any]]) -> None:
    cfg = CONFIGS["groups"]
    single = single_process(cfg, micro=2)
    by_hand = simulated(cfg, sync=True, micro=2)
    for rank, res in enumerate(results):
        assert_close(res["ddp-no-sync"]["params"], single)
        assert_close(res["ddp-no-sync"]["params"], by_hand[rank])


def test_compiled_ddp_model_matches_global_batch(results: list[dict[str, Any]]) -> None:
    single = single_process(CONFIGS["groups"])
    for res in results:
        assert_close(res["ddp-compiled"]["params"], single)
        assert res["ddp-compiled"]["collectives"] == [1] * STEPS


def test_fsdp2_applied_after_the_optimizer_follows_the_sharded_weights(
    results: list[dict[str, Any]],
) -> None:
    """TrAct built first, then ``fully_shard``, and the inner optimizer re-pointed at the
    sharded parameters: the layer's current weight is preconditioned, as when built after."""
    for res in results:
        assert_close(res["fsdp2-tract-first"]["params"], res["ddp/groups"]["params"])


def test_amortised_statistics_under_ddp_and_fsdp2_agree(results: list[dict[str, Any]]) -> None:
    """``stats_every=2``: FSDP2's sharded update equals DDP's, whose steps between refreshes
    use the global refresh rows (``tests/test_amortise.py`` checks that against float64), and
    refresh steps issue the one collective while the steps in between issue none."""
    for res in results:
        assert_close(res["fsdp2-every2"]["params"], res["ddp-every2"]["params"])
        assert res["ddp-every2"]["collectives"] == [1, 0, 1, 0]
        assert res["fsdp2-every2"]["collectives"] == [1, 0, 1, 0]
