"""Writes the `.pth` seeds of the `pth` fuzz target into fuzz/corpus/pth/ with PyTorch's own
writer: a small state dict (ok), one wrapped in {"state_dict": ...} as training scripts save
it (ok), the two malicious pickles of resblock-vision's fixtures (refused), a truncated
archive and a file that is not a zip (refused).

    python3 fuzz/make_pth_seeds.py
"""
import os
import shutil
from collections import OrderedDict

import torch

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "corpus", "pth")
os.makedirs(out, exist_ok=True)

torch.manual_seed(0)
sd = OrderedDict(
    [
        ("conv1.weight", torch.randn(2, 1, 3, 3)),
        ("bn1.running_mean", torch.zeros(2)),
        ("bn1.num_batches_tracked", torch.tensor(3)),
        ("fc.bias", torch.randn(3).half()),
    ]
)
torch.save(sd, os.path.join(out, "ok-state-dict.pth"))
torch.save({"state_dict": sd, "epoch": 4}, os.path.join(out, "ok-wrapped.pth"))

fixtures = os.path.join(here, "..", "crates", "resblock-vision", "tests", "fixtures")
for name in ["evil_system.pth", "evil_eval.pth"]:
    shutil.copy(os.path.join(fixtures, name), os.path.join(out, "bad-" + name))

data = open(os.path.join(out, "ok-state-dict.pth"), "rb").read()
open(os.path.join(out, "bad-truncated.pth"), "wb").write(data[: len(data) // 2])
open(os.path.join(out, "bad-not-zip.pth"), "wb").write(b"\x80\x02}q\x00.")

# A tensor whose pickle claims shape (100000, 100000) over a 7x13 storage: refused before
# anything is allocated for the claim. The pickle is edited (BININT1 7, BININT1 13 become
# BININT 100000 twice) and the archive rewritten, stored as torch.save stores.
import zipfile

small = os.path.join(out, "small.tmp.pth")
torch.save(OrderedDict([("w", torch.ones(7, 13))]), small)
with zipfile.ZipFile(small) as z:
    entries = [(i, z.read(i.filename)) for i in z.infolist()]
big = int(100000).to_bytes(4, "little")
with zipfile.ZipFile(os.path.join(out, "bad-huge-shape.pth"), "w", zipfile.ZIP_STORED) as z:
    for info, data in entries:
        if info.filename.endswith("data.pkl"):
            assert b"K\x07K\x0d" in data
            data = data.replace(b"K\x07K\x0d", b"J" + big + b"J" + big, 1)
        z.writestr(info.filename, data)
os.remove(small)
