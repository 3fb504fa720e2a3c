"""``python -m kdops.info``: versions, devices, the extension's build, and ops × backends.

A backend cell says whether the backend implements the op and can run here ("yes"), is
implemented but not usable on this machine ("not built", "no triton", "no GPU"), or does not
implement it ("not implemented"). "cpu" runs CPU tensors, "cuda" CUDA tensors, "triton" CUDA
tensors (and CPU tensors under TRITON_INTERPRET=1, which the tests set). The "default on
<device>" columns say which backend a call with ``backend=None`` uses on float32 tensors of
that device: ``$KDOPS_BACKEND`` when it is set, else what "auto" picks.

``python -m kdops.info --readme-table`` prints the README's generated part (what is fused, and
the ops table) from :data:`kdops.backend.OPS`; ``--update-readme [PATH]`` rewrites it in place.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

from kdops import _extension
from kdops.backend import (
    BACKEND_ENV_VAR,
    BACKENDS,
    OPS,
    BackendUnavailableError,
    resolve,
    status,
    triton_interpreting,
)

# The README's ops table: (call signature, math, what it equals upstream) per op. The backend
# marks come from OPS, so adding a kernel to OPS and running --update-readme keeps the README true.
OP_DOCS: dict[str, tuple[str, str, str]] = {
    "channel_kl": ("channel_kl(s, t, tau)", "τ² Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C)",
                   "mmrazor `ChannelWiseDivergence`, CIRKD `CriterionCWD('channel','kl')`"),
    "pixel_kl": ("pixel_kl(s, t, tau, target, ignore_index, size, align_corners)",
                 "τ² · mean over valid pixels of KL(softmax_C(t/τ) ‖ softmax_C(s/τ)); with size, of the logits "
                 "resized bilinearly to it (never stored)",
                 "CIRKD `CriterionKD`, APD `CriterionKD`"),
    "attention_map": ("attention_map(x, p, reduce, norm, size)",
                      "Σ_c \\|x_c\\|^p (or mean), resized, then spatial softmax / L2 / none", "SAD, AT `at(x)`"),
    "attention_loss": ("attention_loss(s, t, p, reduce, norm, size)", "mean (A_s − A_t)² at the student's size",
                       "SAD/MAD/LGAD, AT"),
    "class_attention_map": ("class_attention_map(x, weight, bias, norm)",
                            "ReLU(W x + b) normalised per (n, k) over H·W",
                            "CAMD (Grad-CAM of a 1×1 classifier)"),
    "class_attention_loss": ("class_attention_loss(s, t, ws, wt, bs, bt, norm)", "mean (M_s − M_t)²", "CAMD"),
    "prototype_pool": ("prototype_pool(x, labels, K, ignore_index, per_image, normalize_features)",
                       "per-class mean feature (of x or of x/‖x‖) and pixel count", "APD, IFVD class centres"),
    "prototype_kl": ("prototype_kl(s, t, Ps, Pt, counts, tau)",
                     "mean over pixels of KL(softmax(cos(t̂, P̂t)/τ) ‖ softmax(cos(ŝ, P̂s)/τ))", "APD observation KL"),
    "class_variation_loss": ("class_variation_loss(s, t, labels, K, ignore_index)",
                             "mean (cos(s, P_s[y]) − cos(t, P_t[y]))²", "IFVD `CriterionIFV`"),
    "channel_correlation": ("channel_correlation(x, norm)", "G = X Xᵀ, rows L2-normalised (or / L)", "ICKD"),
    "channel_correlation_loss": ("channel_correlation_loss(s, t, norm)", "Σ (G_s − G_t)² / (N·C)",
                                 "ICKD `batch_loss`"),
    "pairwise_affinity_loss": ("pairwise_affinity_loss(s, t, detach_norm=False)",
                               "Σ (X̂_sᵀX̂_s − X̂_tᵀX̂_t)² / (N·L²) via C×C products, no L×L matrix larger than C×C",
                               "SKD `sim_dis_compute` with `detach_norm=True` (on the features as given: "
                               "SKD max-pools them first)"),
}

README_COLUMNS = ("reference", "cpu", "cuda", "triton")
README_BLOCKS = ("fused", "ops-table")


def package_version(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def backend_cell(op: str, backend: str) -> str:
    """Whether ``backend`` implements ``op`` and can run on this machine (see the module doc)."""
    word = status(op, backend)
    if backend == "triton" and word == "yes" and not torch.cuda.is_available() and not triton_interpreting():
        return "no GPU"  # Triton kernels run on CUDA tensors; on CPU ones only in the interpreter
    return word


def default_choice(op: str, device: str) -> str:
    """The backend a ``backend=None`` call uses on float32 ``device`` tensors, or why none can."""
    try:
        return resolve(op, None, torch.device(device), torch.float32)
    except (BackendUnavailableError, ValueError):
        return f"{os.environ.get(BACKEND_ENV_VAR)}: cannot run"


def report() -> str:
    lines = [
        f"kdops {package_version('kdops')}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {package_version('triton')}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"devices: cpu, cuda ({names}; CUDA {torch.version.cuda})")
    else:
        lines.append("devices: cpu (no CUDA device)")
    if _extension.loaded():
        cuda_part = "with" if _extension.built_with_cuda() else "without"
        lines.append(f"extension kdops._C: built, {cuda_part} CUDA kernels")
    else:
        lines.append(f"extension kdops._C: not built ({_extension.load_error()})")
    env = os.environ.get(BACKEND_ENV_VAR)
    lines.append(f"default backend: {BACKEND_ENV_VAR}={env}" if env else
                 f"default backend: auto ({BACKEND_ENV_VAR} not set)")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    header = ["op", *BACKENDS, *(f"default on {d}" for d in devices)]
    rows = [[op, *(backend_cell(op, b) for b in BACKENDS), *(default_choice(op, d) for d in devices)] for op in OPS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += ["", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


# -- the README's generated blocks -------------------------------------------------------------------
def _implemented(op: str, backend: str) -> bool:
    return backend == "reference" or OPS[op].implementation_path(backend) is not None


def readme_fused() -> str:
    """One sentence: which ops have fused kernels today, on which backends."""
    fused = [op for op in OPS if any(_implemented(op, b) for b in README_COLUMNS[1:])]
    if not fused:
        return f"No op has a fused kernel yet: all {len(OPS)} run the reference."
    parts = [f"`{op}` ({', '.join(b for b in README_COLUMNS[1:] if _implemented(op, b))})" for op in fused]
    rest = len(OPS) - len(fused)
    tail = f"; the other {rest} run their reference implementation (plain PyTorch) until their kernels land" \
        if rest else ""
    return f"Fused kernels today: {len(fused)} of the {len(OPS)} ops, {', '.join(parts)}{tail}."


def readme_ops_table() -> str:
    """The README's table of ops × backends (✓: the backend implements the op)."""
    missing = sorted(set(OPS) - set(OP_DOCS))
    if missing:
        raise KeyError(f"kdops.info.OP_DOCS has no README row for {missing}")
    lines = ["| op | math | equals | " + " | ".join(README_COLUMNS) + " |", "|---" * (3 + len(README_COLUMNS)) + "|"]
    for op in OPS:
        call, math, equals = OP_DOCS[op]
        marks = " ".join("✓ |" if _implemented(op, b) else "|" for b in README_COLUMNS)  # "✓ | | | |"
        lines.append(f"| `{call}` | {math} | {equals} | {marks}")
    return "\n".join(lines)


def readme_blocks() -> dict[str, str]:
    return {"fused": readme_fused(), "ops-table": readme_ops_table()}


def update_readme(text: str) -> str:
    """``text`` with each ``<!-- NAME:begin -->`` … ``<!-- NAME:end -->`` block regenerated."""
    for name, body in readme_blocks().items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if text.count(begin) != 1 or text.count(end) != 1:
            raise ValueError(f"the README needs exactly one {begin} … {end} block")
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdops.info", allow_abbrev=False,
                                     description="What kdops was built with and which backend runs each op.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--readme-table", action="store_true",
                       help="print the README's generated blocks (what is fused, the ops table) from kdops.backend.OPS")
    group.add_argument("--update-readme", nargs="?", const="README.md", default=None, metavar="PATH",
                       help="regenerate those blocks in the README at PATH (default: README.md)")
    args = parser.parse_args(argv)
    if args.readme_table:
        for name, body in readme_blocks().items():
            print(f"<!-- {name}:begin -->\n{body}\n<!-- {name}:end -->")
        return 0
    if args.update_readme is not None:
        with open(args.update_readme, encoding="utf-8") as f:
            text = f.read()
        try:
            new = update_readme(text)
        except ValueError as e:
            print(f"python -m kdops.info: error: {args.update_readme}: {e}", file=sys.stderr)
            return 2
        if new != text:
            with open(args.update_readme, "w", encoding="utf-8") as f:
                f.write(new)
        print(f"{args.update_readme}: {'updated' if new != text else 'already up to date'}")
        return 0
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
