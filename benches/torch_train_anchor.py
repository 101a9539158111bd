#!/usr/bin/env python3
"""The PyTorch anchor of the default `train` run, for a same-machine, same-run comparison.

Trains what `cargo run --release -p resblock-examples --bin train` trains by default, in
PyTorch eager on the CPU: CIFAR-style ResNet-20 (option A shortcuts, 1 input channel) on the
bundled MNIST-10k (`data/mnist-10k`), 10 epochs, batch 128 (last batch kept), SGD Nesterov
momentum 0.9, weight decay 5e-4 except on 1-D parameters, one-cycle max lr 0.1
(pct_start 0.3, div_factor 25, final_div_factor 1e4, momentum not cycled), random crops of
28 with 2 px zero padding, per-channel normalisation from the training set, test accuracy
after every epoch. Prints each epoch and the training time (the loop, evaluation included,
as `train` reports it).

    python3 benches/torch_train_anchor.py [--epochs N] [--threads N]

Needs torch and numpy. Used by hand, not by tests.
"""

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "crates/resblock-vision/tests/fixtures"))
from cifar_resnet import cifar  # noqa: E402


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split):
    d = os.path.join(ROOT, "data/mnist-10k")
    prefix = "train" if split == "train" else "t10k"
    x = idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz")).astype(np.float32) / 255.0
    y = idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    xtr, ytr = load("train")
    xte, yte = load("test")
    mean, std = xtr.mean().item(), xtr.std().item()
    model = cifar(20)
    model.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1, momentum=0.9, nesterov=True)
    bs = 128
    steps = (len(xtr) + bs - 1) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=args.epochs * steps, pct_start=0.3, div_factor=25.0,
        final_div_factor=1e4, cycle_momentum=False)
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads: resnet20 on "
          f"MNIST-10k ({len(xtr)} train / {len(xte)} test), {args.epochs} epochs")
    start = time.perf_counter()
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(xtr))
        total = 0.0
        for i in range(steps):
            sel = perm[i * bs:(i + 1) * bs]
            # A random shift of up to 2 px per image, as the Rust loader's RandomCrop.
            shifts = torch.randint(0, 5, (len(sel), 2))
            x = torch.stack([
                F.pad(xtr[j], (2, 2, 2, 2))[:, a:a + 28, b:b + 28]
                for j, (a, b) in zip(sel.tolist(), shifts.tolist())])
            x = (x - mean) / std
            loss = F.cross_entropy(model(x), ytr[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(sel)
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xte), 256):
                out = model((xte[i:i + 256] - mean) / std)
                correct += (out.argmax(1) == yte[i:i + 256]).sum().item()
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / len(xtr):.4f} "
              f"test acc {100 * correct / len(xte):.2f}% | {time.perf_counter() - t0:.1f}s",
              flush=True)
    print(f"test accuracy: {100 * correct / len(xte):.2f}% after {args.epochs} epochs; "
          f"{time.perf_counter() - start:.1f} s of training")


if __name__ == "__main__":
    main()
