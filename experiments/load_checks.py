"""
experiments/load_checks.py: what the checks on a transcoder's files cost as it loads. Loading a CLT
checks every layer's tensors for their sizes and for NaN or ±inf (forge/formats.py check_layer),
one vectorized pass over each tensor; this times a whole load and, in the same run, the checks
alone on the very tensors it read, and reports their share.

The CLT is random at GPT-2-small's shape (12 layers, d = 768) with F features per layer, saved
once by save_pretrained (F = 4096: 1.1 GB of fp32 files, most of them the decoders).

    python experiments/load_checks.py              # F = 4096, ~1 CPU-minute
    python experiments/load_checks.py --features 1024 --reps 1
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from clt import CLTConfig, CrossLayerTranscoder
from experiments.common import Bench, run_study, timed
from forge import formats
from forge.cli import arg, run_main
from forge.files import read_export_file


@dataclass
class LoadChecksBench(Bench):
    """a CLT's load time and the share of it its checks take"""

    features: int = arg(4096, "features per layer (GPT-2-small shape: 12 layers, d = 768)")
    reps: int = arg(3, "loads timed; the fastest counts (the first warms the page cache)")


def run(cfg):
    path = os.path.join(cfg.out, f"load_checks_F{cfg.features}")
    shape = CLTConfig(n_layers=12, d_model=768, n_features=cfg.features)
    if not os.path.exists(os.path.join(path, "config.json")):
        CrossLayerTranscoder(shape).save_pretrained(path)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    loads = [timed(lambda: CrossLayerTranscoder.from_pretrained(path)) for _ in range(cfg.reps)]
    t = CrossLayerTranscoder(shape)
    layers = []
    for l in range(shape.n_layers):  # the tensors as the load reads them, then the checks alone
        files = [read_export_file(path, f"{n}_{l}", None, slice(None)) for n in ("W_enc", "W_dec")]
        layers.append({k.removesuffix(f"_{l}"): v for f in files for k, v in f.items()})

    def check_all():
        for l, tensors in enumerate(layers):
            formats.check_layer(t, l, tensors, "threshold", f"layer {l}")

    checks = [timed(check_all) for _ in range(cfg.reps)]
    load_s = min(wall for wall, _ in loads)
    check_s = min(wall for wall, _ in checks)
    row = dict(features=cfg.features, files_GB=size / 1e9, load_s=load_s, checks_s=check_s)
    row.update(checks_share=check_s / load_s, threads=torch.get_num_threads())
    row.update(load_average=os.getloadavg()[0])
    return [row]


def main(argv=None):
    return run_study(__doc__, "load_checks", run, LoadChecksBench, argv)


if __name__ == "__main__":
    run_main(main)
