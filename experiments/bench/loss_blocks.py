"""The training loss alone, forward and backward: reft_lab's ``BlockedCrossEntropy`` against autograd's
plain cross-entropy over the same logits (what the loss cost before it ran in blocks of rows).

    python experiments/bench/loss_blocks.py                 # config A's shape: 128 scored rows × 49152 logits
    python experiments/bench/loss_blocks.py --rows 1024 --vocab 128256 --device cuda

Both run interleaved in one process, ten calls per round; prints the median of all rounds per
dtype. Nothing is written: the README quotes the printed lines with the command.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from reft_lab.training.loss import BlockedCrossEntropy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="scored positions (config A: 8 × 16)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary (SmolLM2: 49152)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args(argv)
    torch.manual_seed(0)
    targets = torch.randint(0, opts.vocab, (opts.rows,), device=opts.device)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(opts.rows, opts.vocab, device=opts.device).to(dtype)
        losses = {"plain": lambda x: F.cross_entropy(x.float(), targets, reduction="sum"),
                  "blocked": lambda x: BlockedCrossEntropy.apply(x, targets)}
        times = {name: [] for name in losses}
        for _ in range(opts.rounds):
            for name, loss in losses.items():
                for _ in range(10):
                    leaf = logits.detach().requires_grad_()
                    if opts.device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    loss(leaf).backward()
                    if opts.device == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
        medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        print(f"{str(dtype).removeprefix('torch.')} [{opts.rows}, {opts.vocab}] on {opts.device}: "
              f"plain {medians['plain']:.2f} ms, blocked {medians['blocked']:.2f} ms (forward + backward, medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
