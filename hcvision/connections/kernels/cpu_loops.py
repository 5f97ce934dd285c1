"""Opt-in compiled CPU loops for the width mix (HC Eqs. 3-4), its backward and the HC depth backward.

Why: per token the mix is a ``(k + n) x n`` by ``n x c`` product with n = 2-4. MKL's batched GEMM runs such 4-long
inner products at well under half of copy speed (``benchmarks/bench_floor.py``, in copies of the n = 4 streams: about
2.7 for the forward mix, 5-6 for its two backward products, 1.2 for stacking the incoming gradients, 1.6 for the depth
step's two). These loops read each operand once per token while it sits in L1: forward one pass over H (1.7 copies),
backward one pass over H and the two incoming gradients, unstacked, that writes grad H and the per-token grad of the mix
together (3.6), and one pass over the depth step's incoming gradient for ``grad y`` and ``grad B`` (0.9).

Off by default: the default CPU path (``bmm``) needs no compiler and no build. ``HCV_CPU_KERNELS=build`` (or ``1`` /
``on``) opts in: the loops are built with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja, ~30 s
once) under a name and directory whose key hashes the source, the flags, the torch version and the CPU model and flags
(``-march=native`` code never meets another CPU, and two environments never rebuild one name in turn). The cache is
``HCV_CPU_KERNELS_DIR``, else ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/hcvision/cpu_loops``. If the build fails, or
inside ``torch.compile`` (which generates its own loops), every caller uses ``bmm``; tests/test_connections_fast.py
checks both against the reference path.
"""
from __future__ import annotations

import hashlib
import os
import platform
import warnings

import torch

__all__ = ["enabled", "available", "cache_key", "cache_dir", "reset", "mix_forward", "mix_backward",
           "depth_backward"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// out[t, j, :] = sum_i mix[t, i, j] * H[t, i, :]        H (T, n, c), mix (T or 1, n, J), out (T, J, c)
template <typename T>
static void mix_forward_loop(const T* H, const T* mix, T* out, int64_t tokens, int64_t n, int64_t J, int64_t c,
                             bool per_token) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* h = H + t * n * c;
      const T* m = per_token ? mix + t * n * J : mix;
      T* o = out + t * J * c;
      for (int64_t j = 0; j < J; ++j) {
        T* oj = o + j * c;
        const T m0 = m[j];
        #pragma omp simd
        for (int64_t x = 0; x < c; ++x) oj[x] = m0 * h[x];
        for (int64_t i = 1; i < n; ++i) {
          const T mi = m[i * J + j];
          const T* hi = h + i * c;
          #pragma omp simd
          for (int64_t x = 0; x < c; ++x) oj[x] += mi * hi[x];
        }
      }
    }
  });
}

// G = [g_in (T, k, c); g_res (T, n, c)] per token, J = k + n rows:
//   grad_H[t, i, :] (+)= sum_j mix[t, i, j] * G[t, j, :]        grad_mix[t, i, j] = <H[t, i, :], G[t, j, :]>
template <typename T>
static void mix_backward_loop(const T* H, const T* mix, const T* g_in, const T* g_res, T* grad_H, T* grad_mix,
                              int64_t tokens, int64_t n, int64_t k, int64_t c, bool per_token, bool accumulate) {
  const int64_t J = k + n;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<const T*> G(J);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = 0; j < k; ++j) G[j] = g_in + (t * k + j) * c;
      for (int64_t j = 0; j < n; ++j) G[k + j] = g_res + (t * n + j) * c;
      const T* m = per_token ? mix + t * n * J : mix;
      if (grad_H) {
        T* g = grad_H + t * n * c;
        for (int64_t i = 0; i < n; ++i) {
          T* gi = g + i * c;
          int64_t j = 0;
          if (!accumulate) {
            const T m0 = m[i * J];
            const T* G0 = G[0];
            #pragma omp simd
            for (int64_t x = 0; x < c; ++x) gi[x] = m0 * G0[x];
            j = 1;
          }
          for (; j < J; ++j) {
            const T mij = m[i * J + j];
            const T* Gj = G[j];
            #pragma omp simd
            for (int64_t x = 0; x < c; ++x) gi[x] += mij * Gj[x];
          }
        }
      }
      if (grad_mix) {
        const T* h = H + t * n * c;
        T* gm = grad_mix + t * n * J;
        for (int64_t i = 0; i < n; ++i) {
          const T* hi = h + i * c;
          for (int64_t j = 0; j < J; ++j) {
            const T* Gj = G[j];
            T acc = 0;
            #pragma omp simd reduction(+:acc)
            for (int64_t x = 0; x < c; ++x) acc += hi[x] * Gj[x];
            gm[i * J + j] = acc;
          }
        }
      }
    }
  });
}

// HC depth step backward, H' = R + beta y:
//   grad_y[t, :] = sum_i beta[t, i] G[t, i, :],  grad_beta[t, i] = <G[t, i, :], y[t, :]>
template <typename T>
static void depth_backward_loop(const T* G, const T* beta, const T* y, T* grad_y, T* grad_beta, int64_t tokens,
                                int64_t n, int64_t c, bool per_token) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = G + t * n * c;
      const T* b = per_token ? beta + t * n : beta;
      if (grad_y) {
        T* gy = grad_y + t * c;
        const T b0 = b[0];
        #pragma omp simd
        for (int64_t x = 0; x < c; ++x) gy[x] = b0 * g[x];
        for (int64_t i = 1; i < n; ++i) {
          const T bi = b[i];
          const T* gi = g + i * c;
          #pragma omp simd
          for (int64_t x = 0; x < c; ++x) gy[x] += bi * gi[x];
        }
      }
      if (grad_beta) {
        const T* yt = y + t * c;
        for (int64_t i = 0; i < n; ++i) {
          const T* gi = g + i * c;
          T acc = 0;
          #pragma omp simd reduction(+:acc)
          for (int64_t x = 0; x < c; ++x) acc += gi[x] * yt[x];
          grad_beta[t * n + i] = acc;
        }
      }
    }
  });
}

void depth_backward(torch::Tensor G, torch::Tensor beta, torch::Tensor y, c10::optional<torch::Tensor> grad_y,
                    c10::optional<torch::Tensor> grad_beta) {
  const int64_t n = G.size(-2), c = G.size(-1);
  const int64_t tokens = G.numel() / (n * c);
  const bool per_token = beta.numel() > n;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "hcv_depth_backward", [&] {
    depth_backward_loop<scalar_t>(G.data_ptr<scalar_t>(), beta.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                  grad_y.has_value() ? grad_y->data_ptr<scalar_t>() : nullptr,
                                  grad_beta.has_value() ? grad_beta->data_ptr<scalar_t>() : nullptr,
                                  tokens, n, c, per_token);
  });
}

torch::Tensor mix_forward(torch::Tensor H, torch::Tensor mix) {
  const int64_t n = H.size(-2), c = H.size(-1), J = mix.size(-1);
  const int64_t tokens = H.numel() / (n * c);
  const bool per_token = mix.dim() > 2;
  auto out = torch::empty({tokens, J, c}, H.options());
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "hcv_mix_forward", [&] {
    mix_forward_loop<scalar_t>(H.data_ptr<scalar_t>(), mix.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), tokens,
                               n, J, c, per_token);
  });
  return out;
}

void mix_backward(torch::Tensor H, torch::Tensor mix, torch::Tensor g_in, torch::Tensor g_res,
                  c10::optional<torch::Tensor> grad_H, c10::optional<torch::Tensor> grad_mix, bool accumulate) {
  const int64_t n = H.size(-2), c = H.size(-1), k = g_in.size(-2);
  const int64_t tokens = H.numel() / (n * c);
  const bool per_token = mix.dim() > 2;
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "hcv_mix_backward", [&] {
    mix_backward_loop<scalar_t>(H.data_ptr<scalar_t>(), mix.data_ptr<scalar_t>(), g_in.data_ptr<scalar_t>(),
                                g_res.data_ptr<scalar_t>(),
                                grad_H.has_value() ? grad_H->data_ptr<scalar_t>() : nullptr,
                                grad_mix.has_value() ? grad_mix->data_ptr<scalar_t>() : nullptr,
                                tokens, n, k, c, per_token, accumulate);
  });
}
"""

_module = None
_failed = False
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd")
_OPT_IN = ("build", "1", "on", "true", "yes")


def enabled() -> bool:
    """Whether ``HCV_CPU_KERNELS`` opts in to building the loops."""
    return os.environ.get("HCV_CPU_KERNELS", "").strip().lower() in _OPT_IN


def _cpu_model() -> str:
    """Model name and feature flags of this CPU (part of the cache key: ``-march=native`` code is CPU-specific)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info = fh.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = [line.split(":", 1)[1].strip() for line in info.splitlines()
              if line.split(":", 1)[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "|".join(sorted(set(fields))) or platform.machine()


def cache_key() -> str:
    """Hash of the source, flags, torch version and CPU: the build name and directory."""
    text = "\n".join([_SOURCE, " ".join(_FLAGS), torch.__version__, _cpu_model()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> str:
    root = (os.environ.get("HCV_CPU_KERNELS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
            or os.path.join(os.path.expanduser("~"), ".cache", "hcvision", "cpu_loops"))
    return os.path.join(root, f"hcvision_cpu_loops_{cache_key()}")


def _load():
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if not enabled():
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        build = cache_dir()
        os.makedirs(build, exist_ok=True)
        _module = load_inline(
            os.path.basename(build), cpp_sources=_SOURCE, functions=["mix_forward", "mix_backward", "depth_backward"],
            extra_cflags=list(_FLAGS), build_directory=build, verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, ...: the bmm path is complete on its own
        _failed = True
        warnings.warn(f"hcvision: CPU loops unavailable ({type(err).__name__}: {err}); using bmm", stacklevel=3)
    return _module


def reset() -> None:
    """Forget the loaded (or failed) state, so that the next call reads ``HCV_CPU_KERNELS`` again (tests)."""
    global _module, _failed
    _module, _failed = None, False


def available(H: torch.Tensor, mix: torch.Tensor) -> bool:
    """Whether the loops apply: CPU, float32/64, same dtype, mix static ``(n, J)`` or one per token of H, eager."""
    if H.device.type != "cpu" or H.dtype not in (torch.float32, torch.float64) or mix.dtype != H.dtype:
        return False
    if mix.dim() != 2 and mix.shape[:-2] != H.shape[:-2]:
        return False
    if torch.compiler.is_compiling():
        return False
    return _load() is not None


def mix_forward(H: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """``mix^T H`` per token: ``(..., J, c)`` from H ``(..., n, c)`` and mix ``(n, J)`` or ``(..., n, J)``."""
    out = _module.mix_forward(H.contiguous(), mix.contiguous())
    return out.view(*H.shape[:-2], mix.shape[-1], H.shape[-1])


def mix_backward(H, mix, g_in, g_res, *, need_H: bool, need_mix: bool, grad_H: torch.Tensor | None = None):
    """``(mix [g_in; g_res], H [g_in; g_res]^T)``: grad H ``(..., n, c)`` and the per-token grad of the mix
    ``(..., n, J)`` (``None`` where not needed). With ``grad_H`` given, the first is added into it in place."""
    n, c = H.shape[-2], H.shape[-1]
    lead = H.shape[:-2]
    accumulate = grad_H is not None
    if need_H and grad_H is None:
        grad_H = torch.empty(*lead, n, c, dtype=H.dtype)
    grad_mix = torch.empty(*lead, n, mix.shape[-1], dtype=H.dtype) if need_mix else None
    _module.mix_backward(H.contiguous(), mix.contiguous(), g_in.contiguous(), g_res.contiguous(),
                         grad_H if need_H else None, grad_mix, accumulate)
    return (grad_H if need_H else None), grad_mix


def depth_backward(G: torch.Tensor, beta: torch.Tensor, y: torch.Tensor, *, need_y: bool, need_beta: bool):
    """For ``H' = R + beta y`` (G ``(..., n, c)``, beta ``(n, 1)`` or ``(..., n, 1)``, y ``(..., 1, c)``): ``grad y``
    ``(..., 1, c)`` and the per-token ``grad beta`` ``(..., n, 1)`` in one pass over G."""
    lead, n = G.shape[:-2], G.shape[-2]
    grad_y = torch.empty(*lead, 1, G.shape[-1], dtype=G.dtype) if need_y else None
    grad_beta = torch.empty(*lead, n, 1, dtype=G.dtype) if need_beta else None
    _module.depth_backward(G.contiguous(), beta.contiguous(), y.contiguous(), grad_y, grad_beta)
    return grad_y, grad_beta
