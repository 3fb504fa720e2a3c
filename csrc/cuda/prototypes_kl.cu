// CUDA kernels of kdops::prototype_kl, and of the prototypes' normalisation, present classes and
// gradients through the normalisation that its API (and class_variation_loss's) launches. Shared
// pieces and the work units: prototypes_common.cuh.
#include "cuda/prototypes_common.cuh"

namespace kdops {
namespace cuda {

using namespace proto;

namespace {

// ---------------------------------------------------------------------------------------------
// Prototypes: normalisation, present classes, gradients through the normalisation

template <typename Acc>
__global__ void __launch_bounds__(kThreads) normalise_protos_kernel(NormaliseProtosParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const Acc* protos = static_cast<const Acc*>(p.protos) + row * p.c;
  double sq = 0.0;
  for (int64_t c = lane; c < p.c; c += 32) {
    const double v = protos[c];
    sq += v * v;
  }
  const double norm = sqrt(warp_sum(sq));
  const Acc inv = inverse_norm<Acc>(norm);
  Acc* hat = static_cast<Acc*>(p.hat) + row * p.c;
  for (int64_t c = lane; c < p.c; c += 32) hat[c] = protos[c] * inv;
  if (lane == 0) {
    static_cast<Acc*>(p.norm)[row] = static_cast<Acc>(norm);
    static_cast<Acc*>(p.inv)[row] = inv;
  }
}

__global__ void present_classes_kernel(PresentClassesParams p) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  int32_t present = 0;
  for (int64_t k = 0; k < p.k; ++k) {
    if (p.counts[g * p.k + k] > 0) {
      p.present[g * p.k + present] = static_cast<int32_t>(k);
      p.slot[g * p.k + k] = present++;
    } else {
      p.slot[g * p.k + k] = -1;
    }
  }
  p.num_present[g] = present;
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) protos_grad_kernel(ProtosGradParams p) {
  __shared__ double partial[kThreads];
  const int64_t g = blockIdx.x / p.k, k = blockIdx.x % p.k;
  const int64_t row = p.slot != nullptr ? p.slot[g * p.k + k] : k;
  Acc* out = static_cast<Acc*>(p.out) + (g * p.k + k) * p.c;
  int64_t count = 1;
  if (p.counts != nullptr) count = p.counts[g * p.k + k];
  if (row < 0 || count == 0) {
    for (int64_t c = threadIdx.x; c < p.c; c += kThreads) out[c] = Acc(0);
    return;
  }
  const Acc* hat = static_cast<const Acc*>(p.hat) + (g * p.k + k) * p.c;
  const int64_t first = g * p.units_per_group, last = first + p.units_per_group;
  // grad_hat[c]: the units' partial sums in unit order (computed twice, the same bits).
  const auto grad_hat = [&](int64_t c) {
    double sum = 0.0;
    for (int64_t u = first; u < last; ++u) {
      if (p.unit_counts != nullptr && p.unit_counts[u * p.k + k] == 0) continue;
      sum += p.partials[(u * p.k + row) * p.c + c];
    }
    return sum;
  };
  double dot = 0.0;
  for (int64_t c = threadIdx.x; c < p.c; c += kThreads) dot += static_cast<double>(hat[c]) * grad_hat(c);
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  dot = partial[0];
  const bool projects = static_cast<double>(static_cast<const Acc*>(p.norm)[g * p.k + k]) > kNormEps;
  const double inv = static_cast<const Acc*>(p.inv)[g * p.k + k];
  const double inv_count = p.counts != nullptr ? 1.0 / static_cast<double>(count) : 1.0;
  for (int64_t c = threadIdx.x; c < p.c; c += kThreads) {
    const double gh = grad_hat(c);
    const double value = (projects ? gh - static_cast<double>(hat[c]) * dot : gh) * inv;
    out[c] = static_cast<Acc>(value * inv_count);
  }
}

// ---------------------------------------------------------------------------------------------
// prototype_kl

// Shared memory of the prototype_kl kernels.
template <typename Acc>
struct KLShared {
  Acc xs[kTile][kPad];  // a staged 32-channel slice: [channel][pixel]
  // A staged slice of 32 prototypes, [channel][class]: a warp's 4 classes are one aligned
  // vector (rows of kHatPitch elements, a multiple of 4).
  __align__(16) Acc hs[kTile][kHatPitch];
  __align__(16) Acc dt[kTile][kHatPitch];  // a 32-class group's ∂cos, [pixel][class]
  Acc partial[kWarps][kTile];
  Acc norm_s[kTile], inv_s[kTile], norm_t[kTile], inv_t[kTile];
  Acc dot_s[kTile], dot_t[kTile];  // Σ_j ∂cos_j cos_j per pixel (backward)
  double kl[kTile];
};

template <typename Acc>
size_t kl_dynamic_bytes(int64_t num_classes) {
  // cos_s and cos_t: [K][kPad] each; present classes: [K] int32.
  return static_cast<size_t>(num_classes) * (2 * kPad * sizeof(Acc) + sizeof(int32_t));
}

// cos[j][t] = x̂_t · P̂_{present[j]} for the P present classes and the tile's pixels (0 past
// `count`), and the pixels' norms. A block-wide call (every thread, barriers inside).
template <typename T>
__device__ __forceinline__ void tile_cosines(const ProtoFeatures& f, int64_t channels, int64_t n, int64_t l0,
                             int count, const acc_t<T>* hat /* (K, C) of the group */,
                             const int32_t* present, int num_present, KLShared<acc_t<T>>& sh,
                             acc_t<T>* cos /* [K][kPad] */, acc_t<T>* norm_out, acc_t<T>* inv_out) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = static_cast<const T*>(f.data) + n * f.strides.n + (l0 + lane) * f.strides.l;
  Acc sq = 0;  // Σ x² of pixel `lane` over the channels this thread stages (c ≡ warp mod 8)
  for (int j0 = 0; j0 < num_present; j0 += 32) {
    Acc acc[4] = {0, 0, 0, 0};
    for (int64_t c0 = 0; c0 < channels; c0 += 32) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp + kWarps * i;
        const int64_t c = c0 + row;
        Acc v = 0;
        if (c < channels && lane < count) v = load(x + c * f.strides.c);
        sh.xs[row][lane] = v;
        if (j0 == 0) sq += v * v;
        const int j = j0 + row;
        const int64_t hc = c0 + lane;
        sh.hs[lane][row] = j < num_present && hc < channels ? hat[present[j] * channels + hc] : Acc(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int cc = 0; cc < 32; ++cc) {
        const Acc xv = sh.xs[cc][lane];
        Acc h[4];
        load4(&sh.hs[cc][warp * 4], h);  // the same address in every lane: a broadcast
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] += h[r] * xv;
      }
      __syncthreads();
    }
    if (j0 == 0) {
      const Acc total = sum_over_warps(sh.partial, sq);
      if (warp == 0) {
        const double norm = sqrt(static_cast<double>(total));
        norm_out[lane] = static_cast<Acc>(norm);
        inv_out[lane] = inverse_norm<Acc>(norm);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + warp * 4 + r;
      if (j < num_present) cos[j * kPad + lane] = acc[r] * inv_out[lane];
    }
  }
  __syncthreads();
}

// Per pixel, the log-softmaxes over the present classes of o = cos/τ (float64) and the KL;
// backward: cos is replaced by ∂loss/∂cos (0 past `count`) and dot = Σ_j ∂cos_j cos_j.
// A warp per pixel (pixels warp, warp + 8, ...), its lanes along the classes.
template <typename Acc, bool kBackward>
__device__ __forceinline__ void tile_softmax(int num_presents, int count, double inv_tau, double scale,
                             Acc* cos_s, Acc* cos_t, KLShared<Acc>& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_present = num_presents;
  for (int t = warp; t < kTile; t += kWarps) {
    if (t >= count) {
      if (kBackward) {
        for (int j = lane; j < num_present; j += 32) {
          cos_s[j * kPad + t] = Acc(0);
          cos_t[j * kPad + t] = Acc(0);
        }
      }
      if (lane == 0) sh.kl[t] = 0.0;
      continue;
    }
    double max_s = -INFINITY, max_t = -INFINITY;
    for (int j = lane; j < num_present; j += 32) {
      max_s = fmax(max_s, static_cast<double>(cos_s[j * kPad + t]) * inv_tau);
      max_t = fmax(max_t, static_cast<double>(cos_t[j * kPad + t]) * inv_tau);
    }
    max_s = warp_max(max_s);
    max_t = warp_max(max_t);
    double z_s = 0.0, z_t = 0.0;
    for (int j = lane; j < num_present; j += 32) {
      z_s += exp(static_cast<double>(cos_s[j * kPad + t]) * inv_tau - max_s);
      z_t += exp(static_cast<double>(cos_t[j * kPad + t]) * inv_tau - max_t);
    }
    const double log_z_s = log(warp_sum(z_s)), log_z_t = log(warp_sum(z_t));
    double kl = 0.0;
    for (int j = lane; j < num_present; j += 32) {
      const double log_q = static_cast<double>(cos_s[j * kPad + t]) * inv_tau - max_s - log_z_s;
      const double log_p = static_cast<double>(cos_t[j * kPad + t]) * inv_tau - max_t - log_z_t;
      kl += exp(log_p) * (log_p - log_q);
    }
    kl = warp_sum(kl);
    if (lane == 0) sh.kl[t] = kl;
    if (kBackward) {
      double dot_s = 0.0, dot_t = 0.0;
      for (int j = lane; j < num_present; j += 32) {
        const double cs = cos_s[j * kPad + t], ct = cos_t[j * kPad + t];
        const double log_q = cs * inv_tau - max_s - log_z_s;
        const double log_p = ct * inv_tau - max_t - log_z_t;
        const double prob_p = exp(log_p);
        const double ds = scale * (exp(log_q) - prob_p);
        const double dt = scale * prob_p * (log_p - log_q - kl);
        dot_s += ds * cs;
        dot_t += dt * ct;
        cos_s[j * kPad + t] = static_cast<Acc>(ds);
        cos_t[j * kPad + t] = static_cast<Acc>(dt);
      }
      dot_s = warp_sum(dot_s);
      dot_t = warp_sum(dot_t);
      if (lane == 0) {
        sh.dot_s[t] = static_cast<Acc>(dot_s);
        sh.dot_t[t] = static_cast<Acc>(dot_t);
      }
    }
  }
  __syncthreads();
}

// One side's gradients of a tile from dcos[j][t] = ∂loss/∂cos_j at pixel t (0 past `count`),
// both as small GEMMs over 32-class groups with shared-memory operands:
//   features: ∂x̂ = Σ_j dcos_j P̂_j (a warp's 4 channels × a lane's pixel, the group's P̂ slice
//   staged [class][channel]); ∂x = (∂x̂ − x̂ dot) / ‖x‖ (∂x̂ / eps when ‖x‖ ≤ eps);
//   prototypes: partial[j][c] (+)= Σ_t dcos_j[t] x̂_t[c] (a warp's 4 classes × a lane's channel,
//   the group's dcos staged [pixel][class] and x̂ [channel][pixel]), stored on the chunk's first
//   tile, added on the others: one thread owns each element.
template <typename T>
__device__ __forceinline__ void tile_side_grads(const ProtoFeatures& f, int64_t channels, int64_t n, int64_t l0,
                                int count, const acc_t<T>* hat, const int32_t* present,
                                int num_present, const acc_t<T>* dcos, const acc_t<T>* norm,
                                const acc_t<T>* inv, const acc_t<T>* dot, T* grad,
                                const Strides3& grad_strides, double* partial, bool first_tile,
                                KLShared<acc_t<T>>& sh) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = static_cast<const T*>(f.data) + n * f.strides.n;
  if (grad != nullptr) {
    const int64_t l = l0 + lane;
    for (int64_t c0 = 0; c0 < channels; c0 += 32) {
      Acc dx[4] = {0, 0, 0, 0};  // channels c0 + 4·warp + r of pixel `lane`
      for (int j0 = 0; j0 < num_present; j0 += 32) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = warp + kWarps * i;  // class j0 + row, channel c0 + lane
          const int64_t c = c0 + lane;
          sh.hs[row][lane] =
              j0 + row < num_present && c < channels ? hat[present[j0 + row] * channels + c] : Acc(0);
        }
        __syncthreads();
        const int group = num_present - j0 < 32 ? num_present - j0 : 32;
        for (int jj = 0; jj < group; ++jj) {
          const Acc d = dcos[(j0 + jj) * kPad + lane];
          Acc h[4];
          load4(&sh.hs[jj][warp * 4], h);
#pragma unroll
          for (int r = 0; r < 4; ++r) dx[r] += h[r] * d;
        }
        __syncthreads();
      }
      if (lane < count) {
        const Acc inv_l = inv[lane], dot_l = dot[lane];
        const bool projects = static_cast<double>(norm[lane]) > kNormEps;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t c = c0 + warp * 4 + r;
          if (c >= channels) break;
          const Acc xv = load(x + c * f.strides.c + l * f.strides.l);
          const Acc value = (projects ? dx[r] - xv * inv_l * dot_l : dx[r]) * inv_l;
          store(grad + n * grad_strides.n + c * grad_strides.c + l * grad_strides.l, value);
        }
      }
    }
  }
  if (partial == nullptr) return;
  for (int j0 = 0; j0 < num_present; j0 += 32) {
    // The group's dcos as [pixel][class].
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = warp + kWarps * i;
      sh.dt[t][lane] = j0 + lane < num_present ? dcos[(j0 + lane) * kPad + t] : Acc(0);
    }
    for (int64_t c0 = 0; c0 < channels; c0 += 32) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp + kWarps * i;
        const int64_t c = c0 + row;
        sh.xs[row][lane] = c < channels && lane < count
                               ? load(x + c * f.strides.c + (l0 + lane) * f.strides.l) * inv[lane]
                               : Acc(0);
      }
      __syncthreads();
      Acc sum[4] = {0, 0, 0, 0};  // classes j0 + 4·warp + r of channel c0 + lane
#pragma unroll 8
      for (int t = 0; t < kTile; ++t) {
        const Acc xv = sh.xs[lane][t];
        Acc d[4];
        load4(&sh.dt[t][warp * 4], d);
#pragma unroll
        for (int r = 0; r < 4; ++r) sum[r] += d[r] * xv;
      }
      const int64_t c = c0 + lane;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int j = j0 + warp * 4 + r;
        if (j < num_present && c < channels) {
          double* out = partial + static_cast<int64_t>(j) * channels + c;
          *out = first_tile ? static_cast<double>(sum[r]) : *out + static_cast<double>(sum[r]);
        }
      }
      __syncthreads();
    }
  }
}

// Blocks per SM the register budget is cut for: without it ptxas (sm_80, the setup.py flags)
// caps the kernels at 64 registers and spills; the backward keeps ~120 registers (2 blocks).
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads, kBackward ? 2 : 3) prototype_kl_kernel(PrototypeKLParams p) {
  using Acc = acc_t<T>;
  __shared__ KLShared<Acc> sh;
  extern __shared__ __align__(16) unsigned char kl_dynamic[];
  Acc* cos_s = reinterpret_cast<Acc*>(kl_dynamic);
  Acc* cos_t = cos_s + p.k * kPad;
  int32_t* present = reinterpret_cast<int32_t*>(cos_t + p.k * kPad);

  const int64_t chunk = blockIdx.x;
  // 32-bit division (the grid has fewer than 2^31 chunks): a 64-bit one is a call that spills.
  const int64_t n = blockIdx.x / static_cast<uint32_t>(p.chunks_per_image);
  const int64_t chunk_in_image = blockIdx.x % static_cast<uint32_t>(p.chunks_per_image);
  const int64_t g = p.groups == 1 ? 0 : n;
  const int num_present = p.num_present[g];
  for (int64_t k = threadIdx.x; k < num_present; k += kThreads) present[k] = p.present[g * p.k + k];
  __syncthreads();
  const int64_t tiles = (p.l + kTile - 1) / kTile;
  const int64_t first = chunk_in_image * p.tiles_per_chunk;
  const int64_t last = first + p.tiles_per_chunk < tiles ? first + p.tiles_per_chunk : tiles;
  const Acc* hat_s = static_cast<const Acc*>(p.hat_s) + g * p.k * p.cs;
  const Acc* hat_t = static_cast<const Acc*>(p.hat_t) + g * p.k * p.ct;
  double scale = 0.0;
  if (kBackward) scale = static_cast<double>(*static_cast<const Acc*>(p.grad_loss)) * p.grad_scale;
  T* grad_s = static_cast<T*>(p.grad_s);
  T* grad_t = static_cast<T*>(p.grad_t);
  double* partial_s = p.partials_s != nullptr ? p.partials_s + chunk * p.k * p.cs : nullptr;
  double* partial_t = p.partials_t != nullptr ? p.partials_t + chunk * p.k * p.ct : nullptr;
  double chunk_kl = 0.0;
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t l0 = tile * kTile;
    const int count = static_cast<int>(p.l - l0 < kTile ? p.l - l0 : kTile);
    if (num_present == 0) {
      // Nothing present: KL 0, zero gradients (the chunk's partial sums are never read).
      if (kBackward) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane < count) {
          const int64_t l = l0 + lane;
          if (grad_s != nullptr) {
            for (int64_t c = warp; c < p.cs; c += kWarps) {
              store(grad_s + n * p.grad_s_strides.n + c * p.grad_s_strides.c + l * p.grad_s_strides.l, Acc(0));
            }
          }
          if (grad_t != nullptr) {
            for (int64_t c = warp; c < p.ct; c += kWarps) {
              store(grad_t + n * p.grad_t_strides.n + c * p.grad_t_strides.c + l * p.grad_t_strides.l, Acc(0));
            }
          }
        }
      }
      continue;
    }
    tile_cosines<T>(p.student, p.cs, n, l0, count, hat_s, present, num_present, sh, cos_s, sh.norm_s, sh.inv_s);
    tile_cosines<T>(p.teacher, p.ct, n, l0, count, hat_t, present, num_present, sh, cos_t, sh.norm_t, sh.inv_t);
    tile_softmax<Acc, kBackward>(num_present, count, p.inv_tau, scale, cos_s, cos_t, sh);
    if (!kBackward) {
      if (threadIdx.x == 0) {
        for (int t = 0; t < count; ++t) chunk_kl += sh.kl[t];
      }
      __syncthreads();  // sh.kl is rewritten by the next tile
      continue;
    }
    const bool first_tile = tile == first;
    if (grad_s != nullptr || partial_s != nullptr) {
      tile_side_grads<T>(p.student, p.cs, n, l0, count, hat_s, present, num_present, cos_s, sh.norm_s,
                         sh.inv_s, sh.dot_s, grad_s, p.grad_s_strides, partial_s, first_tile, sh);
    }
    if (grad_t != nullptr || partial_t != nullptr) {
      tile_side_grads<T>(p.teacher, p.ct, n, l0, count, hat_t, present, num_present, cos_t, sh.norm_t,
                         sh.inv_t, sh.dot_t, grad_t, p.grad_t_strides, partial_t, first_tile, sh);
    }
    __syncthreads();  // cos_s / cos_t are rewritten by the next tile
  }
  if (!kBackward && threadIdx.x == 0) p.chunk_kl[chunk] = chunk_kl;
}

}  // namespace

cudaError_t launch_normalise_protos(const NormaliseProtosParams& params, cudaStream_t stream) {
  return with_acc(params.dtype, [&](auto tag) {
    normalise_protos_kernel<decltype(tag)><<<grid_for(params.rows, kWarps), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_present_classes(const PresentClassesParams& params, cudaStream_t stream) {
  present_classes_kernel<<<grid_for(params.groups, 64), 64, 0, stream>>>(params);
  return cudaGetLastError();
}

int64_t prototype_kl_tiles_per_chunk(int64_t num_classes, bool backward) {
  if (!backward) return 1;
  // A chunk's partial ∂P̂ (K × C float64) is at most about half its pixels' features (32 · T · C).
  const int64_t tiles = (num_classes + 7) / 8;
  return tiles < 4 ? 4 : (tiles > 64 ? 64 : tiles);
}

size_t prototype_kl_shared_bytes(int64_t num_classes, ProtoDType dtype) {
  return dtype == ProtoDType::kFloat64
             ? sizeof(KLShared<double>) + kl_dynamic_bytes<double>(num_classes)
             : sizeof(KLShared<float>) + kl_dynamic_bytes<float>(num_classes);
}

size_t prototype_kl_max_shared_bytes() { return 160 * 1024; }  // under sm_80's 163 KiB opt-in

template <bool kBackward>
cudaError_t launch_prototype_kl(const PrototypeKLParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * params.chunks_per_image, 1);
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t dynamic = kl_dynamic_bytes<acc_t<T>>(params.k);
    const cudaError_t status =
        allow_shared(prototype_kl_kernel<T, kBackward>, dynamic, sizeof(KLShared<acc_t<T>>));
    if (status != cudaSuccess) return status;
    prototype_kl_kernel<T, kBackward><<<blocks, kThreads, dynamic, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_prototype_kl_forward(const PrototypeKLParams& params, cudaStream_t stream) {
  return launch_prototype_kl<false>(params, stream);
}

cudaError_t launch_prototype_kl_backward(const PrototypeKLParams& params, cudaStream_t stream) {
  return launch_prototype_kl<true>(params, stream);
}

cudaError_t launch_protos_grad(const ProtosGradParams& params, cudaStream_t stream) {
  return with_acc(params.dtype, [&](auto tag) {
    protos_grad_kernel<decltype(tag)><<<grid_for(params.groups * params.k, 1), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdops
