"""Train a small MLP with FSDP2 and Adapprox; report what the optimizer communicates.

CPU, 2 processes (gloo)::

    torchrun --nproc-per-node 2 examples/fsdp2_train.py
    torchrun --nproc-per-node 2 examples/fsdp2_train.py --save /tmp/ckpt      # checkpoint at the end
    torchrun --nproc-per-node 4 examples/fsdp2_train.py --resume /tmp/ckpt    # continue on 4 ranks

GPUs (NCCL), one process per GPU::

    torchrun --nproc-per-node 8 examples/fsdp2_train.py --device cuda --width 1024

The task is regression onto a fixed random "teacher" network, so the script needs no data.
Every rank trains on its own slice of each batch; FSDP2 shards every weight by rows and
Adapprox keeps its factors sharded the same way (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from adapprox_kernels import Adapprox
from adapprox_kernels.distributed import load_optimizer_state, log_collectives, optimizer_state_dict


def mlp(width: int, depth: int) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--k-max", type=int, default=32)
    ap.add_argument("--save", help="write a torch.distributed.checkpoint here after the last step")
    ap.add_argument("--resume", help="load model and optimizer from this checkpoint first")
    args = ap.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank (FSDP2 then keeps each rank's rows)
    teacher = mlp(args.width, 1).to(device)
    model = mlp(args.width, args.depth).to(device)

    mesh = init_device_mesh(args.device, (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = Adapprox(model.parameters(), lr=args.lr, k_max=args.k_max, seed=0)

    first = 0
    if args.resume:
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=args.resume)
        set_model_state_dict(model, sd["model"])
        load_optimizer_state(model, opt, args.resume)
        first = next(iter(opt.state.values()))["step"]

    matrix_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)
    per_rank = args.batch // world
    for step in range(first, first + args.steps):
        gen = torch.Generator().manual_seed(step)  # the same global batch on every rank
        x = torch.randn(args.batch, args.width, generator=gen).to(device)
        with torch.no_grad():
            y = teacher(x)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        with log_collectives() as fsdp_log:  # FSDP2's own all-gathers and reduce-scatters
            loss = nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
        with log_collectives() as log:  # everything the optimizer step communicates
            opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)
        if rank == 0 and (step == first or (step + 1) % 5 == 0):
            report = opt.state_report()
            print(
                f"step {step + 1:4d}  loss {loss.item() / world:.4f}  mean rank {report.mean_rank:6.2f}  "
                f"Adapprox step: {log.count:3d} collectives {log.bytes / 2**20:7.3f} MiB  "
                f"FSDP2 fwd+bwd: {fsdp_log.count:3d} collectives {fsdp_log.bytes / 2**20:7.3f} MiB  "
                f"(weight matrices: {matrix_bytes / 2**20:.3f} MiB)",
                flush=True,
            )

    if args.save:
        state = {"model": get_model_state_dict(model), "optim": optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=args.save)
        if rank == 0:
            print(f"saved {args.save} after step {first + args.steps} on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
