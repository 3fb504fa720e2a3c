"""Per-call overhead of every public op on tiny inputs (DESIGN.md "Backends and dispatch").

    python -m benchmarks.overhead                 # CPU tensors
    python -m benchmarks.overhead --device cuda   # CUDA tensors (GPU machines)

At the logit sizes of a real step the launch and Python overhead, not bandwidth, decides an
op's time. For each op this times, forward only on tiny inputs, three calls of the same work:

* ``public``: ``kdops.<op>(...)`` with ``backend="auto"`` (argument checks + cached dispatch);
* ``bare``: the implementation ``auto`` picked, called directly (``torch.ops.kdops.*`` for the
  C++ kernels, the Triton launcher, or the reference function) — the floor;
* ``reference``: the reference implementation called directly (what plain PyTorch costs).

and reports the medians in µs and ``public − bare`` (target: ≤ 10 µs on CPU). Then, with the
first input requiring grad, a training step's call, forward and backward (``out.sum()`` for an
op that returns a map):

* ``step``: ``kdops.<op>(...)`` with ``backend="auto"``, then ``backward()``: the kernels plus
  the autograd layer (``torch.library.register_autograd``) around them;
* ``reference_step``: the same through ``backend="reference"`` (plain PyTorch autograd).

On tiny inputs these are per-call costs, not bandwidth: what a step pays for each loss it calls.
Results go to ``benchmarks/results/<device>-overhead.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

import kdops
from kdops import backend as kd_backend
from kdops.info import package_version

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NUM_CLASSES = 4


def tiny_calls(device: str):
    """{op: (args, kwargs)} of a tiny call of each public op, positional as the backends take them."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    s, t = randn(2, 4, 4, 4), randn(2, 4, 4, 4)
    labels = torch.randint(0, NUM_CLASSES, (2, 4, 4), generator=g).to(device)
    weight, bias = randn(NUM_CLASSES, 4), randn(NUM_CLASSES)
    protos, counts = kdops.prototype_pool(s, labels, NUM_CLASSES, backend="reference")
    # (public kwargs, backend positional args): the backends take every argument positionally.
    return {
        "channel_kl": ((s, t), {"tau": 4.0}, (s, t, 4.0)),
        "pixel_kl": ((s, t), {"tau": 1.0, "target": labels}, (s, t, 1.0, labels, 255)),
        "attention_map": ((s,), {}, None),
        "attention_loss": ((s, t), {}, None),
        "class_attention_map": ((s, weight), {"bias": bias}, None),
        "class_attention_loss": ((s, t, weight, weight), {}, None),
        "prototype_pool": ((s, labels, NUM_CLASSES), {}, None),
        "prototype_kl": ((s, t, protos, protos, counts), {}, None),
        "class_variation_loss": ((s, t, labels, NUM_CLASSES), {}, None),
        "channel_correlation": ((s,), {}, None),
        "channel_correlation_loss": ((s, t), {}, None),
        "pairwise_affinity_loss": ((s, t), {}, None),
    }


def bare_call(op: str, backend: str, args, kwargs, positional):
    """The chosen implementation with the public op's canonical positional arguments.

    For ops whose positional form is not listed, the public call with the backend named
    explicitly is recorded instead of calling the implementation (it still skips "auto"),
    so their ``bare`` includes the argument checks: marked ``bare_is_checked``.
    """
    if positional is not None:
        fn = kd_backend.implementation(op, backend)
        return (lambda: fn(*positional)), False
    public = getattr(kdops, op)
    return (lambda: public(*args, **kwargs, backend=backend)), True


def median_us(fn, *, repeats: int, inner: int, device: str) -> float:
    for _ in range(inner):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(samples)


def measure_overheads(device: str, repeats: int, inner: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        for op, (args, kwargs, positional) in tiny_calls(device).items():
            public_fn = getattr(kdops, op)
            backend = kd_backend.resolve(op, None, args[0].device, args[0].dtype)
            bare, checked = bare_call(op, backend, args, kwargs, positional)
            reference_fn = kd_backend.implementation(op, "reference")
            reference_args = positional
            row = {
                "op": op,
                "backend": backend,
                "public_us": median_us(lambda: public_fn(*args, **kwargs), repeats=repeats, inner=inner, device=device),
                "bare_us": median_us(bare, repeats=repeats, inner=inner, device=device),
                "bare_is_checked": checked,
            }
            if reference_args is not None:
                row["reference_us"] = median_us(lambda: reference_fn(*reference_args), repeats=repeats,
                                                inner=inner, device=device)
            row["overhead_us"] = row["public_us"] - row["bare_us"]
            rows.append(row)
    for row in rows:
        args, kwargs, _ = tiny_calls(device)[row["op"]]
        leaf = args[0].detach().requires_grad_(True)
        for key, backend in (("step_us", None), ("reference_step_us", "reference")):
            row[key] = median_us(training_step(getattr(kdops, row["op"]), (leaf, *args[1:]), kwargs, backend),
                                 repeats=repeats, inner=inner, device=device)
    return rows


def training_step(public_fn, args, kwargs, backend):
    """A call of public_fn as a training step makes it: forward, then backward into args[0]."""
    leaf = args[0]

    def step():
        leaf.grad = None
        out = public_fn(*args, **kwargs, backend=backend)
        out = out[0] if isinstance(out, tuple) else out  # prototype_pool: (prototypes, counts)
        (out if out.dim() == 0 else out.sum()).backward()

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--inner", type=int, default=200)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = measure_overheads(args.device, args.repeats, args.inner)
    print(f"{'op':26s} {'backend':9s} {'public µs':>10s} {'bare µs':>9s} {'overhead':>9s} {'reference µs':>12s}"
          f" {'step µs':>8s} {'ref. step µs':>12s}")
    for r in rows:
        ref = f"{r['reference_us']:.1f}" if "reference_us" in r else "–"
        mark = "*" if r["bare_is_checked"] else ""
        print(f"{r['op']:26s} {r['backend']:9s} {r['public_us']:10.1f} {r['bare_us']:8.1f}{mark:1s} "
              f"{r['overhead_us']:9.1f} {ref:>12s} {r['step_us']:8.1f} {r['reference_step_us']:12.1f}")
    print("* bare = the public op with the backend named (its checks included)")
    if args.no_save:
        return
    slug = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    result = {
        "device": slug,
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "kdops": package_version("kdops")},
        "command": "python -m benchmarks.overhead" + ("" if args.device == "cpu" else " --device cuda"),
        "rows": rows,
    }
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{slug}-overhead.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
