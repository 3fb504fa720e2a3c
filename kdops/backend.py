"""Which implementation of an op runs: the backend table and its resolution.

Backends:

* ``"reference"`` — plain PyTorch (:mod:`kdops.reference`), every device and dtype. It is the
  specification the others are tested against.
* ``"cpu"`` — the C++ CPU kernels of ``kdops._C``.
* ``"cuda"`` — the CUDA kernels of ``kdops._C``.
* ``"triton"`` — the Triton kernels (:mod:`kdops.triton`): CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported (tests only).
* ``"auto"`` — per op and device, the fastest backend that is available: on CUDA tensors the
  op's ``cuda_order`` (decided by the benchmarks), on CPU tensors ``"cpu"``; the reference
  when none of those can run the call (an op without a fused kernel, or float64 on a GPU).

``KDOPS_BACKEND`` sets the default for calls that pass ``backend=None``. A backend named
explicitly that cannot run the call raises :class:`BackendUnavailableError` saying why:
kdops never falls back silently from a backend the user asked for.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from kdops import _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")
BACKEND_ENV_VAR = "KDOPS_BACKEND"

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Dtypes each backend's kernels are written for; the reference takes any floating dtype.
BACKEND_DTYPES = {
    "triton": _FUSED_DTYPES,
    "cuda": _FUSED_DTYPES,
    "cpu": _FUSED_DTYPES + (torch.float64,),  # float64 for gradcheck of the C++ kernels
}


class BackendUnavailableError(RuntimeError):
    """An explicitly named backend cannot run this call (not built, wrong device or dtype)."""


@dataclass(frozen=True)
class OpSpec:
    """Where each backend's implementation of one op lives.

    Implementations are ``"module:function"`` paths imported on first use (importing triton
    costs seconds); ``None`` means the backend does not implement the op. The function takes
    the op's arguments positionally, already validated by the public API.
    """

    name: str
    reference: str
    cpu: str | None = None
    cuda: str | None = None
    triton: str | None = None
    # Order "auto" tries on CUDA tensors: fastest first in the committed GPU results
    # (benchmarks/results/nvidia-*.json; tests/test_dispatch_order.py holds it to them).
    # ``cuda_order_by_dtype`` overrides it for dtypes whose ranking differs.
    cuda_order: tuple[str, ...] = ("cuda", "triton")
    cuda_order_by_dtype: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The kdops:: op of the extension whose kernels the cpu/cuda implementation calls, when it is
    # not the op's own name (the attention ops are composed on kdops::attention_reduce and
    # kdops::class_attention_scores).
    kernel_op: str | None = None

    def implementation_path(self, backend: str) -> str | None:
        return getattr(self, backend)

    def order_on_cuda(self, dtype: torch.dtype) -> tuple[str, ...]:
        """The fused backends "auto" tries on CUDA tensors of ``dtype``, fastest first."""
        name = str(dtype).removeprefix("torch.")
        return dict(self.cuda_order_by_dtype).get(name, self.cuda_order)


def _ref(module: str, fn: str) -> str:
    return f"kdops.reference.{module}:{fn}"


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "channel_kl",
            _ref("softmax_kl", "channel_kl"),
            cpu="kdops.ops.softmax_kl:_channel_kl_extension",
            cuda="kdops.ops.softmax_kl:_channel_kl_extension",
            triton="kdops.triton.channel_kl:channel_kl",
        ),
        OpSpec(
            "pixel_kl",
            _ref("softmax_kl", "pixel_kl"),
            cpu="kdops.ops.softmax_kl:_pixel_kl_extension",
            cuda="kdops.ops.softmax_kl:_pixel_kl_extension",
            triton="kdops.triton.pixel_kl:pixel_kl",
        ),
        OpSpec(
            "attention_map",
            _ref("attention", "attention_map"),
            cpu="kdops.ops.attention:_attention_map_extension",
            cuda="kdops.ops.attention:_attention_map_extension",
            triton="kdops.triton.attention:attention_map",
            kernel_op="attention_reduce",
        ),
        OpSpec(
            "attention_loss",
            _ref("attention", "attention_loss"),
            cpu="kdops.ops.attention:_attention_loss_extension",
            cuda="kdops.ops.attention:_attention_loss_extension",
            triton="kdops.triton.attention:attention_loss",
        ),
        OpSpec(
            "class_attention_map",
            _ref("attention", "class_attention_map"),
            cpu="kdops.ops.attention:_class_attention_map_extension",
            cuda="kdops.ops.attention:_class_attention_map_extension",
            triton="kdops.triton.attention:class_attention_map",
            kernel_op="class_attention_scores",
        ),
        OpSpec(
            "class_attention_loss",
            _ref("attention", "class_attention_loss"),
            cpu="kdops.ops.attention:_class_attention_loss_cpu",
            cuda="kdops.ops.attention:_class_attention_loss_extension",
            triton="kdops.triton.attention:class_attention_loss",
            kernel_op="class_attention_scores",
        ),
        OpSpec(
            "prototype_pool",
            _ref("prototypes", "prototype_pool"),
            cpu="kdops.ops.prototypes:_prototype_pool_extension",
            cuda="kdops.ops.prototypes:_prototype_pool_extension",
            triton="kdops.triton.prototypes:prototype_pool",
        ),
        OpSpec(
            "prototype_kl",
            _ref("prototypes", "prototype_kl"),
            cpu="kdops.ops.prototypes:_prototype_kl_extension",
            cuda="kdops.ops.prototypes:_prototype_kl_extension",
            triton="kdops.triton.prototypes:prototype_kl",
            # H200 fp32: Triton 1.4 / 1.7 ms, CUDA 1.6 / 3.2 ms fwd+bwd at (8,512,64,128) / (8,256,128,256).
            cuda_order=("triton", "cuda"),
        ),
        OpSpec(
            "class_variation_loss",
            _ref("prototypes", "class_variation_loss"),
            cpu="kdops.ops.prototypes:_class_variation_loss_extension",
            cuda="kdops.ops.prototypes:_class_variation_loss_extension",
            triton="kdops.triton.prototypes:class_variation_loss",
        ),
        OpSpec(
            "channel_correlation",
            _ref("correlation", "channel_correlation"),
            cpu="kdops.ops.correlation:_channel_correlation_extension",
            cuda="kdops.ops.correlation:_channel_correlation_extension",
            triton="kdops.triton.correlation:channel_correlation",
        ),
        OpSpec(
            "channel_correlation_loss",
            _ref("correlation", "channel_correlation_loss"),
            cpu="kdops.ops.correlation:_channel_correlation_loss_extension",
            cuda="kdops.ops.correlation:_channel_correlation_loss_extension",
            triton="kdops.triton.correlation:channel_correlation_loss",
            # H200 fp32: Triton 3.5 / 4.8 ms, CUDA 4.5 / 7.1 ms fwd+bwd at (8,512,64,128) / (8,256,128,256).
            cuda_order=("triton", "cuda"),
        ),
        OpSpec(
            "pairwise_affinity_loss",
            _ref("correlation", "pairwise_affinity_loss"),
            cpu="kdops.ops.correlation:_pairwise_affinity_loss_extension",
            cuda="kdops.ops.correlation:_pairwise_affinity_loss_extension",
            triton="kdops.triton.correlation:pairwise_affinity_loss",
        ),
    )
}


def default_backend() -> str:
    """The backend used when a call passes ``backend=None``: ``$KDOPS_BACKEND`` or "auto"."""
    name = os.environ.get(BACKEND_ENV_VAR, "auto")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV_VAR}={name!r} is not a backend; choose one of {('auto',) + BACKENDS}"
        )
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run ``op`` on tensors of this device type and dtype, else None."""
    spec = OPS[op]
    if backend == "reference":
        return None
    if spec.implementation_path(backend) is None:
        return f"the {backend} backend does not implement {op}"
    if dtype not in BACKEND_DTYPES[backend]:
        names = ", ".join(str(d).removeprefix("torch.") for d in BACKEND_DTYPES[backend])
        return f"the {backend} kernels take {names}, not {str(dtype).removeprefix('torch.')}"
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device_type == "cpu" and not triton_interpreting():
            return "Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device_type} tensors"
        return None
    # The C++ extension: one torch op per kdops op, dispatched on the tensors' device.
    wanted_device = backend  # the "cpu" backend serves CPU tensors, "cuda" CUDA tensors
    if device_type != wanted_device:
        return f"the {backend} backend runs on {wanted_device} tensors, not {device_type}"
    if not _extension.loaded():
        return f"kdops._C is not built ({_extension.load_error()})"
    if backend == "cuda" and not _extension.built_with_cuda():
        return "kdops._C was built without its CUDA kernels (no CUDA torch or nvcc at build time)"
    kernel_op = spec.kernel_op or op
    if not _extension.has_kernel(kernel_op, backend.upper()):
        return f"kdops._C has no {backend.upper()} kernel for kdops::{kernel_op}"
    return None


def _auto_order(op: str, device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    if device_type == "cuda":
        return OPS[op].order_on_cuda(dtype) + ("reference",)
    if device_type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


# Resolution reads the environment and the dispatcher, never tensors: torch.compile runs it
# eagerly while tracing and bakes the chosen backend into the graph. It also imports the
# chosen implementation's module, which dynamo could not trace on an op's first call.
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` for tensors on ``device`` with ``dtype``.

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError` when a
    named backend cannot run the call. Answers are cached per (op, backend, device type,
    dtype, environment): at the sizes of a real step a call's Python overhead matters.
    """
    name = _resolve_cached(
        op, backend, device.type, dtype,
        os.environ.get(BACKEND_ENV_VAR), os.environ.get("TRITON_INTERPRET"),
    )
    implementation(op, name)  # a dict lookup once imported; the import itself happens here
    return name


@functools.lru_cache(maxsize=1024)
def _resolve_cached(op, backend, device_type, dtype, env_backend, env_interpret) -> str:
    # env_backend and env_interpret are part of the key: the answer depends on them.
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; kdops has {sorted(OPS)}")
    name = default_backend() if backend is None else backend
    if name == "auto":
        name = next(
            candidate
            for candidate in _auto_order(op, device_type, dtype)
            if unavailable_reason(op, candidate, device_type, dtype) is None
        )
    elif name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not a backend; choose one of {('auto',) + BACKENDS}")
    else:
        reason = unavailable_reason(op, name, device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend={name!r} cannot run kdops.{op} on {device_type} {dtype} tensors: {reason}"
            )
    return name


_IMPLEMENTATIONS: dict[tuple[str, str], object] = {}


def implementation(op: str, backend: str):
    """The function implementing ``op`` on ``backend`` (its module imported on first use)."""
    key = (op, backend)
    fn = _IMPLEMENTATIONS.get(key)
    if fn is None:
        path = OPS[op].implementation_path(backend)
        if path is None:
            raise BackendUnavailableError(f"the {backend} backend does not implement {op}")
        module, _, attr = path.partition(":")
        fn = getattr(importlib.import_module(module), attr)
        _IMPLEMENTATIONS[key] = fn
    return fn


def dispatch(op: str, backend: str | None, like: torch.Tensor):
    """Resolve the backend for tensors like ``like`` and return its implementation."""
    return implementation(op, resolve(op, backend, like.device, like.dtype))


def status(op: str, backend: str) -> str:
    """A device-independent word for the info table: implemented and built, or why not."""
    spec = OPS[op]
    if backend == "reference":
        return "yes"
    if spec.implementation_path(backend) is None:
        return "not implemented"
    if backend == "triton":
        return "yes" if triton_installed() else "no triton"
    if not _extension.loaded():
        return "not built"
    if backend == "cuda" and not _extension.built_with_cuda():
        return "not built"
    return "yes" if _extension.has_kernel(spec.kernel_op or op, backend.upper()) else "not built"
