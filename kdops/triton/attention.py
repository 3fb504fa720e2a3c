"""Triton kernels of the attention maps: ``kdops_triton::attention_reduce`` (SAD, MAD, LGAD, AT)
and ``kdops_triton::class_attention_scores`` (CAMD), forward and backward.

Math (specification: :mod:`kdops.reference.attention`; the split of the work between these
kernels and the map-sized steps: :mod:`kdops.ops.attention`):

    attention_reduce:        a[n, l] = scale · Σ_c |x[n, c, l]|^p      (scale 1 or 1/C)
        backward:            ∂/∂x = g[n, l] · scale · p·|x|^(p−1)·sign(x), 0 at x = 0
    class_attention_scores:  R[n, k, l] = ReLU(Σ_c W[k, c]·x[n, c, l] + b[k])
        backward, g' = g·[R > 0]:  grad_x = Wᵀ g',  grad_W = Σ_n g' xᵀ  (grad_b = Σ g' in torch)

Each program of the reduce owns a tile of positions and walks the channels in blocks, so a map
element is one program's fixed-order sum (deterministic) and x is read once; the backward
kernel reads x once more and writes each gradient element once. Accumulation is float32;
offsets are int64.

Products. float32 inputs: ``tl.dot(..., input_precision="ieee")`` (float32-accurate, never
TF32). 16-bit inputs: tensor-core dots with float32 accumulation, where the float32 operand
(the weight, or g') is split into a 16-bit head and a 16-bit tail, hi + lo, and both are
multiplied: x is exact in its dtype, and hi·x + lo·x carries ~16 significant bits of the float32
operand instead of the 8 (bf16) a single rounding keeps.

File layout: jit helpers → kernels → launchers → ``kdops_triton::`` ops (``custom_op``; fake
kernels and autograd registered by :mod:`kdops.ops.attention`, the same way as for the C++ ops)
→ the backend entry points. Why ``custom_op`` and not ``triton_op``: see :mod:`kdops.triton`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdops.ops.attention import fused_backend_functions, register_attention_ops
from kdops.triton import _launch
from kdops.triton._launch import GradBuffer, check_kernel_dtype, device_guard, flatten, new_buffer

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Test hooks. With kdops.triton._launch.POISON_OUTPUTS every buffer a launcher allocates
# starts as NaN, so a test
# proves that every element is written. _LAUNCH_OVERRIDES replaces block sizes (keys
# "reduce_block_c", "reduce_block_l", "class_block_k", "class_block_c", "class_block_l") so small
# test inputs cross blocks.
_LAUNCH_OVERRIDES: dict[str, int] = {}

# PowerKind of csrc/common/attention.h: the exponents with a pow-free form.
_GENERAL, _ABS, _SQUARE, _CUBE = 0, 1, 2, 3


def _power_kind(p: float) -> int:
    return {1.0: _ABS, 2.0: _SQUARE, 3.0: _CUBE}.get(float(p), _GENERAL)


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _abs_power(x, p, KIND: tl.constexpr):
    """|x|^p in float32 (exp2(p·log2|x|) for a general p; 0 at x = 0)."""
    if KIND == 1:
        return tl.abs(x)
    elif KIND == 2:
        return x * x
    elif KIND == 3:
        return tl.abs(x) * x * x
    else:
        a = tl.abs(x)
        safe = tl.where(a > 0, a, 1.0)
        return tl.where(a > 0, tl.exp2(p * tl.log2(safe)), 0.0)


@triton.jit
def _abs_power_grad(x, p, KIND: tl.constexpr):
    """d|x|^p/dx = p·|x|^(p−1)·sign(x), 0 at x = 0 (also for p < 1)."""
    if KIND == 1:
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    elif KIND == 2:
        return 2.0 * x
    elif KIND == 3:
        return 3.0 * x * tl.abs(x)
    else:
        a = tl.abs(x)
        safe = tl.where(a > 0, a, 1.0)
        magnitude = p * tl.exp2((p - 1.0) * tl.log2(safe))
        return tl.where(x > 0, magnitude, tl.where(x < 0, -magnitude, 0.0))


@triton.jit
def _dot_low(a, b, LOW: tl.constexpr, EXACT_F32_DOT: tl.constexpr):
    """a @ b of two LOW (16-bit) tiles with float32 accumulation: tensor cores; or, with
    EXACT_F32_DOT, the same products in float32 (a product of two 16-bit values is exact in
    float32) — for Triton's interpreter, whose bfloat16 tl.dot is wrong (triton 3.9)."""
    if EXACT_F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_f32(a, b, LOW: tl.constexpr, EXACT_F32_DOT: tl.constexpr):
    """a @ b of float32 tiles, float32-accurate: IEEE float32 when LOW is float32, else b exact
    in LOW (16-bit input values) and a split a = hi + lo into LOW: hi·b + lo·b on tensor cores."""
    if LOW == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        hi = a.to(LOW)
        lo = (a - hi.to(tl.float32)).to(LOW)
        b_low = b.to(LOW)
        return _dot_low(hi, b_low, LOW, EXACT_F32_DOT) + _dot_low(lo, b_low, LOW, EXACT_F32_DOT)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attention_reduce_kernel(
    x_ptr, map_ptr, C, L, stride_n, stride_c, stride_l, p, scale,
    KIND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (n, tile of BLOCK_L positions): map[n, tile] = scale·Σ_c |x|^p."""
    n = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    position_mask = positions < L
    base = x_ptr + n * stride_n + positions[None, :] * stride_l
    total = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (channels[:, None] < C) & position_mask[None, :]
        x = tl.load(base + channels[:, None] * stride_c, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(_abs_power(x, p, KIND), axis=0)  # |0|^p = 0 off the tensor
    tl.store(map_ptr + n * L + positions, total * scale, mask=position_mask)


@triton.jit
def _attention_reduce_backward_kernel(
    grad_map_ptr, x_ptr, grad_x_ptr, C, L, stride_n, stride_c, stride_l,
    grad_stride_n, grad_stride_c, grad_stride_l, p, scale,
    KIND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (n, tile of positions, block of channels): grad_x = g·scale·∂|x|^p/∂x."""
    n = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    channels = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    position_mask = positions < L
    mask = (channels[:, None] < C) & position_mask[None, :]
    g = tl.load(grad_map_ptr + n * L + positions, mask=position_mask, other=0.0) * scale
    x = tl.load(x_ptr + n * stride_n + channels[:, None] * stride_c + positions[None, :] * stride_l,
                mask=mask, other=0.0).to(tl.float32)
    grad = g[None, :] * _abs_power_grad(x, p, KIND)
    tl.store(grad_x_ptr + n * grad_stride_n + channels[:, None] * grad_stride_c
             + positions[None, :] * grad_stride_l,
             grad.to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _class_scores_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, K, C, L, stride_n, stride_c, stride_l, w_stride_k, w_stride_c,
    HAS_BIAS: tl.constexpr, LOW: tl.constexpr, EXACT_F32_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (n, tile of positions, block of classes): out = ReLU(W·x[n] + b)."""
    n = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    classes = tl.program_id(2).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    position_mask = positions < L
    class_mask = classes < K
    acc = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        channel_mask = channels < C
        w = tl.load(w_ptr + classes[:, None] * w_stride_k + channels[None, :] * w_stride_c,
                    mask=class_mask[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + n * stride_n + channels[:, None] * stride_c + positions[None, :] * stride_l,
                    mask=channel_mask[:, None] & position_mask[None, :], other=0.0).to(tl.float32)
        acc += _dot_f32(w, x, LOW, EXACT_F32_DOT)
    if HAS_BIAS:
        acc += tl.load(b_ptr + classes, mask=class_mask, other=0.0).to(tl.float32)[:, None]
    acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + (n * K + classes[:, None]) * L + positions[None, :], acc,
             mask=class_mask[:, None] & position_mask[None, :])


@triton.jit
def _class_grad_x_kernel(
    g_ptr, w_ptr, grad_x_ptr, K, C, L, w_stride_k, w_stride_c,
    grad_stride_n, grad_stride_c, grad_stride_l,
    LOW: tl.constexpr, EXACT_F32_DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (n, tile of positions, block of channels): grad_x[n] = Wᵀ·g'[n]."""
    n = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    channels = tl.program_id(2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    position_mask = positions < L
    channel_mask = channels < C
    acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        classes = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        class_mask = classes < K
        w_t = tl.load(w_ptr + classes[None, :] * w_stride_k + channels[:, None] * w_stride_c,
                      mask=class_mask[None, :] & channel_mask[:, None], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + (n * K + classes[:, None]) * L + positions[None, :],
                    mask=class_mask[:, None] & position_mask[None, :], other=0.0)
        if LOW == tl.float32:
            acc += tl.dot(w_t, g, input_precision="ieee")
        else:
            # Both operands are float32 here: split each, keep the three leading products.
            w_hi = w_t.to(LOW)
            w_lo = (w_t - w_hi.to(tl.float32)).to(LOW)
            g_hi = g.to(LOW)
            g_lo = (g - g_hi.to(tl.float32)).to(LOW)
            acc += (_dot_low(w_hi, g_hi, LOW, EXACT_F32_DOT) + _dot_low(w_lo, g_hi, LOW, EXACT_F32_DOT)
                    + _dot_low(w_hi, g_lo, LOW, EXACT_F32_DOT))
    tl.store(grad_x_ptr + n * grad_stride_n + channels[:, None] * grad_stride_c
             + positions[None, :] * grad_stride_l,
             acc.to(grad_x_ptr.dtype.element_ty),
             mask=channel_mask[:, None] & position_mask[None, :])


@triton.jit
def _class_grad_w_kernel(
    g_ptr, x_ptr, partial_ptr, K, C, L, stride_n, stride_c, stride_l,
    LOW: tl.constexpr, EXACT_F32_DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program per (block of classes, block of channels, n): partial[n] = g'[n]·x[n]ᵀ,
    the positions walked in order (summed over n afterwards, in order: deterministic)."""
    classes = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    class_mask = classes < K
    channel_mask = channels < C
    acc = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        positions = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
        position_mask = positions < L
        g = tl.load(g_ptr + (n * K + classes[:, None]) * L + positions[None, :],
                    mask=class_mask[:, None] & position_mask[None, :], other=0.0)
        x_t = tl.load(x_ptr + n * stride_n + channels[None, :] * stride_c + positions[:, None] * stride_l,
                      mask=channel_mask[None, :] & position_mask[:, None], other=0.0).to(tl.float32)
        acc += _dot_f32(g, x_t, LOW, EXACT_F32_DOT)
    tl.store(partial_ptr + (n * K + classes[:, None]) * C + channels[None, :], acc,
             mask=class_mask[:, None] & channel_mask[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _check_p(p: float) -> None:
    if not (p > 0 and p < float("inf")):
        raise ValueError(f"p must be finite and > 0, got {p}")


def _block(name: str, default: int) -> int:
    return _LAUNCH_OVERRIDES.get(name, default)


def _check_features(name: str, x: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"{name} must have shape (N, C, *spatial), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    check_kernel_dtype(name, x)


def _reduce_blocks(flat: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_L): positions along the unit stride when L is it (coalesced rows),
    else more channels per load (channels_last reads runs of C)."""
    if flat.stride(2) == 1:
        return _block("reduce_block_c", 8), _block("reduce_block_l", 256)
    return _block("reduce_block_c", 64), _block("reduce_block_l", 32)


def _attention_reduce(x: torch.Tensor, p: float, mean: bool) -> torch.Tensor:
    _check_features("x", x)
    _check_p(p)
    flat = flatten(x)
    n, c, length = flat.shape
    out = new_buffer((n, *x.shape[2:]), torch.float32, x.device)
    block_c, block_l = _reduce_blocks(flat)
    with device_guard(x):
        _attention_reduce_kernel[(n, triton.cdiv(length, block_l))](
            flat, out, c, length, *flat.stride(), float(p), 1.0 / c if mean else 1.0,
            KIND=_power_kind(p), BLOCK_C=block_c, BLOCK_L=block_l,
        )
    return out


def _attention_reduce_backward(grad_map: torch.Tensor, x: torch.Tensor, p: float, mean: bool) -> torch.Tensor:
    _check_features("x", x)
    _check_p(p)
    expected = (x.shape[0], *x.shape[2:])
    if tuple(grad_map.shape) != expected:
        raise ValueError(f"grad_map must have the map's shape {expected}, got {tuple(grad_map.shape)}")
    flat = flatten(x)
    n, c, length = flat.shape
    g = grad_map.to(torch.float32).contiguous()
    grad = GradBuffer(x)
    block_c, block_l = _reduce_blocks(flat)
    with device_guard(x):
        _attention_reduce_backward_kernel[(n, triton.cdiv(length, block_l), triton.cdiv(c, block_c))](
            g, flat, grad.flat, c, length, *flat.stride(), *grad.flat.stride(), float(p),
            1.0 / c if mean else 1.0, KIND=_power_kind(p), BLOCK_C=block_c, BLOCK_L=block_l,
        )
    return grad.finish()


def _exact_f32_dot(x: torch.Tensor) -> bool:
    """16-bit dots as float32 products: only under the interpreter, whose bf16 dot is wrong."""
    return x.dtype == torch.bfloat16 and not x.is_cuda


def _class_blocks(low) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_C, BLOCK_L); tl.dot needs each ≥ 16."""
    return (_block("class_block_k", 32), _block("class_block_c", 32 if low == tl.float32 else 64),
            _block("class_block_l", 64))


def _check_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (K, C) with C = {x.shape[1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape (K,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _class_attention_scores(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check_features("x", x)
    _check_weight(x, weight, bias)
    flat = flatten(x)
    n, c, length = flat.shape
    k = weight.shape[0]
    out = new_buffer((n, k, *x.shape[2:]), torch.float32, x.device)
    low = _TL_DTYPES[x.dtype]
    block_k, block_c, block_l = _class_blocks(low)
    with device_guard(x):
        _class_scores_kernel[(n, triton.cdiv(length, block_l), triton.cdiv(k, block_k))](
            flat, weight, bias if bias is not None else weight, out, k, c, length, *flat.stride(),
            *weight.stride(), HAS_BIAS=bias is not None, LOW=low, EXACT_F32_DOT=_exact_f32_dot(x),
            BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_L=block_l,
        )
    return out


def _class_attention_scores_backward(
    grad_maps: torch.Tensor, maps: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    x_requires_grad: bool, weight_requires_grad: bool, bias_requires_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_features("x", x)
    _check_weight(x, weight, None)
    flat = flatten(x)
    n, c, length = flat.shape
    k = weight.shape[0]
    # g' = g·[R > 0]: the gradient through the ReLU (ReLU'(0) = 0), map-sized.
    g = (grad_maps.to(torch.float32) * (maps > 0)).reshape(n, k, length).contiguous()
    low = _TL_DTYPES[x.dtype]
    block_k, block_c, block_l = _class_blocks(low)
    # An empty tensor of its own for each gradient not requested (outputs must not alias).
    grad_x, grad_w, grad_b = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    with device_guard(x):
        if x_requires_grad:
            grad = GradBuffer(x)
            _class_grad_x_kernel[(n, triton.cdiv(length, block_l), triton.cdiv(c, block_c))](
                g, weight, grad.flat, k, c, length, *weight.stride(), *grad.flat.stride(),
                LOW=low, EXACT_F32_DOT=_exact_f32_dot(x), BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_L=block_l,
            )
            grad_x = grad.finish()
        if weight_requires_grad:
            partial = new_buffer((n, k, c), torch.float32, x.device)
            _class_grad_w_kernel[(triton.cdiv(k, block_k), triton.cdiv(c, block_c), n)](
                g, flat, partial, k, c, length, *flat.stride(),
                LOW=low, EXACT_F32_DOT=_exact_f32_dot(x), BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_L=block_l,
            )
            grad_w = partial.sum(0)
    if bias_requires_grad:
        grad_b = g.sum((0, 2))
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::{attention_reduce, class_attention_scores}{, _backward}
# ---------------------------------------------------------------------------------------------

torch.library.custom_op(
    "kdops_triton::attention_reduce", _attention_reduce, mutates_args=(),
    schema="(Tensor x, float p, bool mean) -> Tensor map",
)
torch.library.custom_op(
    "kdops_triton::attention_reduce_backward", _attention_reduce_backward, mutates_args=(),
    schema="(Tensor grad_map, Tensor x, float p, bool mean) -> Tensor grad_x",
)
torch.library.custom_op(
    "kdops_triton::class_attention_scores", _class_attention_scores, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor maps",
)
torch.library.custom_op(
    "kdops_triton::class_attention_scores_backward", _class_attention_scores_backward, mutates_args=(),
    schema=(
        "(Tensor grad_maps, Tensor maps, Tensor x, Tensor weight, bool x_requires_grad, "
        "bool weight_requires_grad, bool bias_requires_grad) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)"
    ),
)

register_attention_ops("kdops_triton")


# ---------------------------------------------------------------------------------------------
# backend entry points (kdops.backend.OPS): validated arguments, positional
# ---------------------------------------------------------------------------------------------

_FUNCTIONS = fused_backend_functions("kdops_triton")
attention_map = _FUNCTIONS["attention_map"]
attention_loss = _FUNCTIONS["attention_loss"]
class_attention_map = _FUNCTIONS["class_attention_map"]
class_attention_loss = _FUNCTIONS["class_attention_loss"]
