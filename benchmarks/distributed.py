"""Vocab-parallel cross-entropy: bytes communicated per row and time, 2 gloo ranks vs 1.

Run: ``python benchmarks/distributed.py [--rows 4096 --vocab 32000 --hidden 256]``.

Each configuration runs in freshly spawned processes joined by a gloo group over TCP on
127.0.0.1, each with ``--threads`` intra-op threads (default 1: with 2 threads per process,
OpenMP barriers collapse when other jobs share the cores, as on the 2-core dev box).
Bytes are the payloads handed to ``all_reduce`` (counted by wrapping it), per row of
logits; a ring all-reduce moves about 2 (W-1)/W times that per rank over the wire. For
comparison, gathering the logits instead would move (V - V/W) * 4 bytes per row.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def count_bytes():
    """Wrap dist.all_reduce to add up the bytes it is handed; returns the counter dict."""
    counter = {"bytes": 0, "calls": 0}
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        counter["calls"] += 1
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    return counter


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank, world, port, args, queue):
    from xloss.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    gen = torch.Generator().manual_seed(0)
    rows, vocab, hidden_size = args.rows, args.vocab, args.hidden
    local = vocab // world + (1 if rank < vocab % world else 0)
    logits = torch.randn(rows, local, generator=gen).requires_grad_(True)  # N x V_local
    target = torch.randint(0, vocab, (rows,), generator=gen)
    hidden = torch.randn(rows, hidden_size, generator=gen).requires_grad_(True)
    weight = (torch.randn(local, hidden_size, generator=gen) * 0.05).requires_grad_(True)
    results = {}

    def ce_step():
        logits.grad = None
        vocab_parallel_cross_entropy(logits, target, label_smoothing=0.1).backward()

    def linear_step():
        hidden.grad = weight.grad = None
        vocab_parallel_linear_cross_entropy(hidden, weight, target, label_smoothing=0.1).backward()

    stats_max = torch.zeros(rows + world)
    stats_sum = torch.zeros(3, rows)
    grad_hidden = torch.zeros(rows, hidden_size)

    def comm_step():  # the collectives alone: those of the CE, and linear CE's grad_input
        dist.all_reduce(stats_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(stats_sum)

    def grad_input_step():
        dist.all_reduce(grad_hidden)

    results["comm_ce_s"] = timed(comm_step, args.repeats)
    results["comm_grad_input_s"] = timed(grad_input_step, args.repeats)
    for name, step in (("ce", ce_step), ("linear", linear_step)):
        counter = count_bytes()
        step()
        results[name + "_bytes_per_row"] = counter["bytes"] / rows
        results[name + "_collectives"] = counter["calls"]
        results[name + "_s"] = timed(step, args.repeats)
    if world == 1:
        full = logits.detach().clone().requires_grad_(True)

        def torch_step():
            full.grad = None
            F.cross_entropy(full, target, label_smoothing=0.1).backward()

        results["torch_ce_s"] = timed(torch_step, args.repeats)
    queue.put((rank, results))
    dist.destroy_process_group()


def run(world, args):
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=worker, args=(rank, world, port, args, queue))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=600) for _ in range(world))
    for process in processes:
        process.join(60)
    return results


def rows_h(args) -> str:
    return f"{args.rows} x {args.hidden} fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256, help="for the linear variant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    args = parser.parse_args()
    print(
        f"N={args.rows} V={args.vocab} H={args.hidden} fp32 label_smoothing=0.1, "
        f"{args.threads} thread(s) per rank, median of {args.repeats}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    single = run(1, args)[0]
    print(f"torch F.cross_entropy, 1 process:        {single['torch_ce_s'] * 1e3:8.1f} ms fwd+bwd")
    labels = {"ce": "vocab_parallel_cross_entropy", "linear": "vocab_parallel_linear_ce"}
    for world, ranks in ((1, {0: single}), (2, run(2, args))):
        for name, label in labels.items():
            seconds = max(r[name + "_s"] for r in ranks.values())  # the slowest rank
            print(
                f"{label:28s} {world} rank(s): {seconds * 1e3:8.1f} ms fwd+bwd, "
                f"{ranks[0][name + '_collectives']:3d} all-reduces, "
                f"{ranks[0][name + '_bytes_per_row']:7.1f} bytes/row"
            )
        comm = max(r["comm_ce_s"] for r in ranks.values())
        grad_input = max(r["comm_grad_input_s"] for r in ranks.values())
        print(
            f"  collectives alone at {world} rank(s): the 2 of the CE {comm * 1e3:.2f} ms, "
            f"linear CE's grad_input all-reduce ({rows_h(args)}) {grad_input * 1e3:.2f} ms"
        )
    gather_bytes = (args.vocab - args.vocab // 2) * 4
    print(f"(all-gathering the logits instead: {gather_bytes} bytes/row at 2 ranks)")


if __name__ == "__main__":
    main()
