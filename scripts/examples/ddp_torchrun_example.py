"""TrAct under DDP, launched with torchrun: a small CNN on scikit-learn's digits.

    torchrun --nproc_per_node=2 -m scripts.examples.ddp_torchrun_example [--quick]

Wrap the model first, then create the optimizers from it. ``TrActOptimizer`` sums the first
layer's input statistics over the ranks before each step, so every replica applies the update
that single-process TrAct would make on the global batch; the script checks that the replicas
still agree at the end. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from scripts.data import load_digits_data
from scripts.models import digits_cnn
from tract_optim import TrActOptimizer


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m scripts.examples.ddp_torchrun_example",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--quick", action="store_true", help="one short epoch (seconds)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    data = load_digits_data()
    count, epochs = (256, 1) if args.quick else (len(data.train_x), 8)
    train = TensorDataset(data.train_x[:count], data.train_y[:count])
    sampler = DistributedSampler(train, shuffle=True, seed=0)  # each rank its slice
    loader = DataLoader(train, batch_size=32, sampler=sampler)
    model = digits_cnn().to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)  # wrap first ...
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)  # ... then the optimizers
    opt = TrActOptimizer(sgd, model.conv1, lam=0.1, clip_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
            opt.step()
            sched.step()
    weight = model.conv1.weight.detach()
    replicas = [torch.empty_like(weight) for _ in range(dist.get_world_size())]
    dist.all_gather(replicas, weight)
    assert all(torch.equal(r, weight) for r in replicas), "replicas drifted apart"
    if dist.get_rank() == 0:
        with torch.no_grad():
            logits = model.eval()(data.test_x.to(device))
        accuracy = (logits.argmax(1).cpu() == data.test_y).float().mean()
        print(f"test accuracy {accuracy:.3f}; {len(replicas)} replicas agree")
    dist.barrier()  # leave together: gloo aborts a rank whose peer tore down first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
