"""``backend="auto"`` on CUDA tensors follows the committed GPU results, never a guess.

For every GPU results file (``benchmarks/results/nvidia-*.json``) and every op measured there
with more than one fused backend, the backends ranked by their total forward+backward time over
the file's shapes, per dtype, must be the op's ``order_on_cuda(dtype)``. A new results file
that ranks differently fails this test until ``kdops/backend.py`` follows it.
"""
import glob
import json
import os
from collections import defaultdict

import pytest
import torch

from kdops import backend as kd_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_KINDS = ("-recipes.json", "-overhead.json", "-gains.json", "-matmul.json")
GPU_RESULTS = sorted(p for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "nvidia-*.json"))
                     if not p.endswith(OTHER_KINDS))
FUSED = ("cuda", "triton")


def measured_rankings(path):
    """{(op, dtype): fused backends fastest first} for the ops with ≥ 2 fused backends measured."""
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if "error" not in r and r["variant"] in FUSED]
    totals = defaultdict(lambda: defaultdict(float))
    shapes = defaultdict(lambda: defaultdict(set))
    for row in rows:
        totals[(row["op"], row["dtype"])][row["variant"]] += row["fwd_bwd_ms"]
        shapes[(row["op"], row["dtype"])][row["variant"]].add(row["shape"])
    rankings = {}
    for key, by_backend in totals.items():
        if len(by_backend) < 2:
            continue
        # Compare like with like: every backend measured at the same shapes.
        assert len({frozenset(s) for s in shapes[key].values()}) == 1, f"{path}: {key} shapes differ"
        rankings[key] = tuple(sorted(by_backend, key=by_backend.get))
    return rankings


def test_there_are_gpu_results():
    assert GPU_RESULTS, "no benchmarks/results/nvidia-*.json: auto's CUDA order would be a guess"


@pytest.mark.parametrize("path", GPU_RESULTS, ids=os.path.basename)
def test_auto_cuda_order_follows_the_results(path):
    rankings = measured_rankings(path)
    for (op, dtype_name), ranking in rankings.items():
        order = kd_backend.OPS[op].order_on_cuda(getattr(torch, dtype_name))
        measured_here = tuple(b for b in order if b in ranking)
        assert measured_here == ranking, (
            f"{os.path.basename(path)}: {op} {dtype_name} measured fastest-first {ranking}, "
            f"but OPS[{op!r}] orders {order}"
        )


def test_every_fused_cuda_backend_is_ordered():
    for op, spec in kd_backend.OPS.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            order = spec.order_on_cuda(dtype)
            implemented = {b for b in FUSED if spec.implementation_path(b) is not None}
            assert implemented <= set(order), f"{op}: {implemented - set(order)} missing from the CUDA order"


def test_ranking_reads_a_file(tmp_path):
    rows = [
        {"op": "channel_kl", "dtype": "float32", "shape": s, "variant": v, "fwd_bwd_ms": ms}
        for s, v, ms in (("a", "cuda", 2.0), ("a", "triton", 1.0), ("b", "cuda", 2.0), ("b", "triton", 1.5))
    ]
    path = tmp_path / "nvidia-x.json"
    path.write_text(json.dumps({"rows": rows}))
    assert measured_rankings(str(path)) == {("channel_kl", "float32"): ("triton", "cuda")}
