"""PyTorch's side of `cargo xtask bench --compare-torch`.

Times the same workloads as benches/benches/*.rs (same ids, shapes, batch sizes, models and
optimizer settings) with PyTorch eager on the CPU, with as many threads as resblock uses
(RAYON_NUM_THREADS, else all cores), and writes {id: mean seconds per iteration} as JSON.

    python3 benches/torch_bench.py --out target/torch-bench.json [--filter SUBSTRING]
    python3 benches/torch_bench.py --memory ARCH BATCH SIZE STEPS   # peak RSS, one JSON line
    python3 benches/torch_bench.py --device cuda --min-time 1 --out torch-cuda.json

`--device cuda` times the same workloads on the GPU (every tensor and model made there, the
device synchronised after each call, PyTorch's default TF32 settings) under `cuda/...` ids,
for the GPU check's `--torch FILE` (`benches/examples/gpu-check/`); it adds a 4096 GEMM row.

Needs only torch (pip install torch). The CIFAR ResNets come from
crates/resblock-vision/tests/fixtures/cifar_resnet.py (the same definitions the parity fixtures
use); ResNet-18/50 from torchvision when it is installed, else from benches/torch_resnet.py
(the same layers).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../crates/resblock-vision/tests/fixtures"))
sys.path.insert(0, HERE)
from cifar_resnet import cifar  # noqa: E402

try:
    import torchvision.models as imagenet_models

    IMAGENET_SOURCE = "torchvision"
except ImportError:
    import torch_resnet as imagenet_models  # noqa: E402

    IMAGENET_SOURCE = "benches/torch_resnet.py"

BENCHES = {}

# After each timed call: torch.cuda.synchronize on the GPU (`--device cuda`).
SYNC = lambda: None  # noqa: E731
# `--min-time`: every row's minimum measuring time, in place of its own (None: its own).
MIN_TIME = None


def bench(name):
    def reg(f):
        BENCHES[name] = f
        return f

    return reg


def measure(step, min_time=3.0, min_iters=5, warmup=2):
    """Mean seconds per call of step() over at least min_iters calls and min_time seconds."""
    if MIN_TIME is not None:
        min_time = MIN_TIME
    for _ in range(warmup):
        step()
        SYNC()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_time:
        step()
        SYNC()
        n += 1
    return (time.perf_counter() - start) / n


@bench("cpu/gemm/f32_1024")
def gemm():
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return measure(lambda: a @ b)


@bench("cpu/toy_residual/1000_epochs")
def toy():
    # The article's program: a Linear(10, 10) residual block fitted to random data with MSE
    # and Adam (lr 0.01), 1000 epochs of full-batch steps on 100 samples.
    def run():
        torch.manual_seed(42)
        lin = nn.Linear(10, 10)
        x, y = torch.randn(100, 10), torch.randn(100, 10)
        opt = torch.optim.Adam(lin.parameters(), lr=0.01)
        for _ in range(1000):
            opt.zero_grad()
            loss = F.mse_loss(lin(x) + x, y)
            loss.backward()
            opt.step()

    return measure(run, min_time=3.0, min_iters=3)


@bench("cpu/residual_mlp_block/fwd_bwd/w256_h1024_bs128")
def mlp():
    ln, fc1, fc2 = nn.LayerNorm(256), nn.Linear(256, 1024), nn.Linear(1024, 256)
    x = torch.randn(128, 256)

    def step():
        y = x + fc2(F.gelu(fc1(ln(x))))
        y.pow(2).mean().backward()

    return measure(step)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.down(x))


@bench("cpu/basic_block_16_32_s2/fwd_bwd/bs32_32x32")
def basic_block():
    block = BasicBlock(16, 32, 2).train()
    x = torch.rand(32, 16, 32, 32)
    return measure(lambda: block(x).pow(2).mean().backward())


def train_workload(arch, batch, size):
    """The step of `TrainWorkload` in benches/src/lib.rs: SGD with Nesterov momentum, weight
    decay on weights only, cross-entropy, random inputs, labels i % 10."""
    torch.manual_seed(0)
    # ImageNet ResNets by name (resnet18, resnet50, ...), else the CIFAR ResNet of that depth
    # (resnet20, resnet56): (50 - 2) % 6 == 0 too, so the depth alone cannot decide.
    if hasattr(imagenet_models, arch):
        net = getattr(imagenet_models, arch)()
    else:
        net = cifar(int(arch[len("resnet"):]))
    net.train()
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    x = torch.randn(batch, 3, size, size)
    y = torch.arange(batch) % 10

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return step


def train_step(arch, batch, size, min_time=5.0):
    return measure(train_workload(arch, batch, size), min_time=min_time)


@bench("cpu/resnet20/train_step/bs128")
def resnet20():
    return train_step("resnet20", 128, 32)


@bench("cpu/resnet56/train_step/bs128")
def resnet56():
    return train_step("resnet56", 128, 32)


@bench("cpu/resnet50/train_step/bs32")
def resnet50_train():
    return train_step("resnet50", 32, 224, min_time=10.0)


def infer(arch, batch):
    net = getattr(imagenet_models, arch)().eval()
    x = torch.randn(batch, 3, 224, 224)

    def step():
        with torch.inference_mode():
            net(x)

    return measure(step, min_time=5.0)


# PyTorch eager has no folded variant: both of ours are compared with the same eager model.
for _arch in ["resnet18", "resnet50"]:
    for _bs in [1, 8]:
        for _suffix in ["", "_folded"]:
            bench(f"cpu/{_arch}/infer/bs{_bs}{_suffix}")(
                lambda a=_arch, b=_bs: infer(a, b)
            )

# Single 3x3 convolutions (padding 1) at ResNet shapes: (name, batch, c_in, c_out, size, stride).
CONVS = [
    ("c16_32x32_bs128", 128, 16, 16, 32, 1),
    ("c64_56x56_bs8", 8, 64, 64, 56, 1),
    ("c128_56x56_s2_bs8", 8, 64, 128, 56, 2),
    ("c256_14x14_bs8", 8, 256, 256, 14, 1),
]


def conv_fwd(n, ci, co, hw, s):
    x, w = torch.randn(n, ci, hw, hw), torch.randn(co, ci, 3, 3)
    with torch.no_grad():
        return measure(lambda: F.conv2d(x, w, padding=1, stride=s))


def conv_bwd(n, ci, co, hw, s):
    x = torch.randn(n, ci, hw, hw, requires_grad=True)
    w = torch.randn(co, ci, 3, 3, requires_grad=True)
    y = F.conv2d(x, w, padding=1, stride=s)
    r = torch.randn_like(y)
    # The backward alone: both gradients, as our conv's backward computes them together.
    return measure(lambda: torch.autograd.grad(y, (x, w), r, retain_graph=True))


for _name, _n, _ci, _co, _hw, _s in CONVS:
    bench(f"cpu/conv3x3/{_name}/fwd")(lambda a=(_n, _ci, _co, _hw, _s): conv_fwd(*a))
    bench(f"cpu/conv3x3/{_name}/bwd_data_and_weight")(
        lambda a=(_n, _ci, _co, _hw, _s): conv_bwd(*a)
    )

BNS = [("c16_32x32_bs128", 128, 16, 32), ("c64_56x56_bs8", 8, 64, 56)]


def bn_train(n, c, hw):
    bn = nn.BatchNorm2d(c).train()
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    r = torch.randn(n, c, hw, hw)
    params = (x, bn.weight, bn.bias)
    # Forward, then the backward from the output gradient `r` (as the conv rows and as our
    # side's `backward_from`): the three gradients.
    return measure(lambda: torch.autograd.grad(F.relu(bn(x)), params, r))


for _name, _n, _c, _hw in BNS:
    bench(f"cpu/batch_norm_relu/{_name}/train_fwd_bwd")(lambda a=(_n, _c, _hw): bn_train(*a))


def peak_memory(arch, batch, size, steps):
    """Runs `steps` training steps in this (fresh) process and prints its peak resident set
    size, and its resident size before the workload was built (torch imported), as one JSON
    line, like benches/examples/peak-memory.rs."""
    import resource

    with open("/proc/self/status") as fh:
        base = next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) * 1024
    step = train_workload(arch, batch, size)
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"id": f"cpu/{arch}/train_step/bs{batch}", "peak_rss_bytes": peak,
                      "base_rss_bytes": base, "steps": steps}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--filter", default="")
    ap.add_argument(
        "--memory",
        nargs=4,
        metavar=("ARCH", "BATCH", "SIZE", "STEPS"),
        help="print the peak RSS of STEPS training steps instead of timing",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--min-time", type=float, help="each row's minimum measuring time (s)")
    args = ap.parse_args()
    global SYNC, MIN_TIME
    MIN_TIME = args.min_time
    meta = {}
    if args.device == "cuda":
        torch.set_default_device("cuda")
        SYNC = torch.cuda.synchronize
        BENCHES["cpu/gemm/f32_4096"] = lambda: (
            lambda a: measure(lambda: a @ a)
        )(torch.randn(4096, 4096))
        meta = {
            "device": torch.cuda.get_device_name(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    threads = int(os.environ.get("RAYON_NUM_THREADS") or os.cpu_count())
    torch.set_num_threads(threads)
    if args.memory:
        arch, batch, size, steps = args.memory
        peak_memory(arch, int(batch), int(size), int(steps))
        return
    if not args.out:
        ap.error("--out is required when timing")
    results = {}
    for name, f in BENCHES.items():
        name = name.replace("cpu/", f"{args.device}/", 1)
        if args.filter in name:
            results[name] = f()
            print(f"torch {name}: {results[name] * 1e3:.3f} ms", file=sys.stderr)
    results["_meta"] = {
        "torch": torch.__version__,
        "threads": threads,
        "imagenet_models": IMAGENET_SOURCE,
        **meta,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
