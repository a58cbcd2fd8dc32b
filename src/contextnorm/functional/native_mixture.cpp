// Native CPU passes of the mixture layers' training transform (contextnorm/functional/mixture.py,
// the reference and the implementation everywhere else).
//
// The PyTorch implementation materialises x' = x - r and x'^2 and reduces them with a dozen
// skinny batched matrix products, each a pass over activation-sized tensors; a pass here reads
// the activations once per sample and computes x' on the fly, so nothing activation-sized is
// allocated but the output. The autograd function and the small (K, C) algebra stay in Python.
//
// Layout: x and G (N, C, L) contiguous with positions innermost, per-position weights (N, K, L),
// coefficients (K, C), r (C,); one dtype (float32 or float64). Sums over positions are taken per
// row in that dtype and over rows in double, in a fixed order for a given thread count. The
// loops sit inside AT_DISPATCH's macro argument, where only the _Pragma operator is allowed.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace contextnorm {

using at::Tensor;
using OptionalTensor = c10::optional<Tensor>;

namespace {

void check_positions(const Tensor& x, const Tensor& reference, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(), name,
              " must be a contiguous (N, C, L) CPU tensor");
  TORCH_CHECK(reference.dim() == 1 && reference.size(0) == x.size(1) &&
                  reference.scalar_type() == x.scalar_type(),
              "reference must have shape (C,) = (", x.size(1), ",) and the input's dtype");
}

void check_weights(const Tensor& w, const Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(0) == x.size(0) && w.size(1) == K &&
                  w.size(2) == x.size(2) && w.scalar_type() == x.scalar_type(),
              name, " must be a contiguous (N, K, L) tensor of the input's dtype with K = ", K);
}

void check_table(const Tensor& t, int64_t K, int64_t C, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == K && t.size(1) == C, name, " must have shape (", K,
              ", ", C, ")");
}

// Runs body(n, accumulator) over the samples in a fixed number of chunks, each with its own
// zeroed accumulator of `size` doubles, and returns their sum in chunk order (the same result
// for a given thread count, whatever the scheduling).
template <typename Body>
std::vector<double> sum_over_samples(int64_t N, int64_t size, int64_t values_per_sample,
                                     const Body& body) {
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>({N, static_cast<int64_t>(at::get_num_threads()),
                            std::max<int64_t>(1, N * values_per_sample / at::internal::GRAIN_SIZE)}));
  std::vector<std::vector<double>> partial(chunks, std::vector<double>(size, 0.0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      for (int64_t n = N * chunk / chunks; n < N * (chunk + 1) / chunks; ++n) {
        body(n, partial[chunk].data());
      }
    }
  });
  std::vector<double> total(size, 0.0);
  for (const auto& part : partial) {
    for (int64_t i = 0; i < size; ++i) total[i] += part[i];
  }
  return total;
}

// x' = row - rc for one row of L positions, into d.
template <typename T>
void centre(const T* row, T rc, int64_t L, T* d) {
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) d[l] = row[l] - rc;
}

int64_t sample_grain(int64_t values_per_sample) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, values_per_sample));
}

template <typename T>
Tensor to_tensor(const std::vector<double>& values, std::vector<int64_t> shape,
                 const Tensor& like) {
  auto out = at::empty(shape, like.options());
  std::copy(values.begin(), values.end(), out.data_ptr<T>());
  return out;
}

}  // namespace

// out[n, k, l] = gamma_k + sum_c (alpha_kc x' + beta_kc) x' with x' = x[n, c, l] - r_c: the
// log-joint of ACN's posterior, or any projection of x' and x'^2 onto K rows of coefficients.
Tensor mixture_logits(const Tensor& x, const Tensor& reference, const Tensor& alpha,
                      const Tensor& beta, const Tensor& gamma) {
  check_positions(x, reference, "x");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = alpha.size(0);
  check_table(alpha, K, C, "alpha");
  check_table(beta, K, C, "beta");
  TORCH_CHECK(gamma.numel() == K, "gamma must have K = ", K, " values");
  const auto a_ = alpha.contiguous(), b_ = beta.contiguous(), g_ = gamma.contiguous();
  auto out = at::empty({N, K, L}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_logits", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *r = reference.data_ptr<T>();
    const T *a = a_.data_ptr<T>(), *b = b_.data_ptr<T>(), *g = g_.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, N, sample_grain(C * L), [&](int64_t begin, int64_t end) {
      std::vector<T> d(L);
      for (int64_t n = begin; n < end; ++n) {
        T* on = o + n * K * L;
        for (int64_t k = 0; k < K; ++k) std::fill(on + k * L, on + (k + 1) * L, g[k]);
        for (int64_t c = 0; c < C; ++c) {
          centre(xp + (n * C + c) * L, r[c], L, d.data());
          for (int64_t k = 0; k < K; ++k) {
            const T ak = a[k * C + c], bk = b[k * C + c];
            T* ok = on + k * L;
_Pragma("omp simd")
            for (int64_t l = 0; l < L; ++l) ok[l] += (ak * d[l] + bk) * d[l];
          }
        }
      }
    });
  });
  return out;
}

// (2, K, C): sum_{n,l} w[n, k, l] x' and sum w x'^2.
Tensor mixture_sums(const Tensor& x, const Tensor& reference, const Tensor& weights) {
  check_positions(x, reference, "x");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = weights.size(1);
  check_weights(weights, x, K, "weights");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_sums", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *r = reference.data_ptr<T>(), *w = weights.data_ptr<T>();
    auto total = sum_over_samples(N, 2 * K * C, C * L, [&](int64_t n, double* acc) {
      std::vector<T> dn(L);
      for (int64_t c = 0; c < C; ++c) {
        centre(xp + (n * C + c) * L, r[c], L, dn.data());
        for (int64_t k = 0; k < K; ++k) {
          const T* wk = w + (n * K + k) * L;
          T first = 0, second = 0;
_Pragma("omp simd reduction(+ : first, second)")
          for (int64_t l = 0; l < L; ++l) {
            const T wd = wk[l] * dn[l];
            first += wd;
            second += wd * dn[l];
          }
          acc[k * C + c] += first;
          acc[(K + k) * C + c] += second;
        }
      }
    });
    out = to_tensor<T>(total, {2, K, C}, x);
  });
  return out;
}

// y[n, c, l] = sum_k tau[n, k, l] (scale_kc x' + shift_kc).
Tensor mixture_output(const Tensor& x, const Tensor& reference, const Tensor& tau,
                      const Tensor& scale, const Tensor& shift) {
  check_positions(x, reference, "x");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = tau.size(1);
  check_weights(tau, x, K, "tau");
  check_table(scale, K, C, "scale");
  check_table(shift, K, C, "shift");
  const auto s_ = scale.contiguous(), h_ = shift.contiguous();
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_output", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *r = reference.data_ptr<T>(), *t = tau.data_ptr<T>();
    const T *s = s_.data_ptr<T>(), *h = h_.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    at::parallel_for(0, N, sample_grain(C * L), [&](int64_t begin, int64_t end) {
      std::vector<T> d(L);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          T* out = yp + (n * C + c) * L;
          centre(xp + (n * C + c) * L, r[c], L, d.data());
          std::fill(out, out + L, T(0));
          for (int64_t k = 0; k < K; ++k) {
            const T sk = s[k * C + c], hk = h[k * C + c];
            const T* tk = t + (n * K + k) * L;
_Pragma("omp simd")
            for (int64_t l = 0; l < L; ++l) out[l] += tk[l] * (sk * d[l] + hk);
          }
        }
      }
    });
  });
  return y;
}

// The output's backward: (2, K, C) sums of tau G x' and tau G, and, with `with_tau`, the
// posterior's gradient (N, K, L): sum_c G (scale_kc x' + shift_kc).
std::vector<Tensor> mixture_output_backward(const Tensor& grad, const Tensor& x,
                                            const Tensor& reference, const Tensor& tau,
                                            const Tensor& scale, const Tensor& shift,
                                            bool with_tau) {
  check_positions(x, reference, "x");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == x.scalar_type(),
              "grad must be contiguous and shaped and typed as x");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = tau.size(1);
  check_weights(tau, x, K, "tau");
  check_table(scale, K, C, "scale");
  check_table(shift, K, C, "shift");
  const auto s_ = scale.contiguous(), h_ = shift.contiguous();
  Tensor sums;
  Tensor grad_tau = with_tau ? at::zeros({N, K, L}, x.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_output_backward", [&] {
    using T = scalar_t;
    const T *gp = grad.data_ptr<T>(), *xp = x.data_ptr<T>(), *r = reference.data_ptr<T>();
    const T *t = tau.data_ptr<T>(), *s = s_.data_ptr<T>(), *h = h_.data_ptr<T>();
    T* gt = with_tau ? grad_tau.data_ptr<T>() : nullptr;
    auto total = sum_over_samples(N, 2 * K * C, C * L, [&](int64_t n, double* acc) {
      std::vector<T> d(L);
      for (int64_t c = 0; c < C; ++c) {
        const T* g = gp + (n * C + c) * L;
        centre(xp + (n * C + c) * L, r[c], L, d.data());
        for (int64_t k = 0; k < K; ++k) {
          const T* tk = t + (n * K + k) * L;
          T centred = 0, plain = 0;
_Pragma("omp simd reduction(+ : centred, plain)")
          for (int64_t l = 0; l < L; ++l) {
            const T tg = tk[l] * g[l];
            centred += tg * d[l];
            plain += tg;
          }
          acc[k * C + c] += centred;
          acc[(K + k) * C + c] += plain;
          if (gt != nullptr) {
            const T sk = s[k * C + c], hk = h[k * C + c];
            T* gk = gt + (n * K + k) * L;
_Pragma("omp simd")
            for (int64_t l = 0; l < L; ++l) gk[l] += g[l] * (sk * d[l] + hk);
          }
        }
      }
    });
    sums = to_tensor<T>(total, {2, K, C}, x);
  });
  return {sums, grad_tau};
}

// The input's gradient: G sum_k tau_k scale_kc + x' sum_k (tau_k slope_kc + logit_k slope2_kc)
// + sum_k (tau_k offset_kc + logit_k offset2_kc); the logit terms only with `logit_grad`.
Tensor mixture_input_grad(const Tensor& grad, const Tensor& x, const Tensor& reference,
                          const Tensor& tau, const Tensor& scale, const Tensor& slope,
                          const Tensor& offset, const OptionalTensor& logit_grad,
                          const OptionalTensor& slope2, const OptionalTensor& offset2) {
  check_positions(x, reference, "x");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == x.scalar_type(),
              "grad must be contiguous and shaped and typed as x");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = tau.size(1);
  check_weights(tau, x, K, "tau");
  for (const auto* table : {&scale, &slope, &offset}) check_table(*table, K, C, "coefficients");
  const bool logits = logit_grad.has_value() && logit_grad->defined();
  if (logits) {
    check_weights(*logit_grad, x, K, "logit_grad");
    TORCH_CHECK(slope2.has_value() && offset2.has_value(), "logit_grad needs slope2 and offset2");
    check_table(*slope2, K, C, "slope2");
    check_table(*offset2, K, C, "offset2");
  }
  const auto sc = scale.contiguous(), sl = slope.contiguous(), of = offset.contiguous();
  const auto sl2 = logits ? slope2->contiguous() : Tensor();
  const auto of2 = logits ? offset2->contiguous() : Tensor();
  auto grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_input_grad", [&] {
    using T = scalar_t;
    const T *gp = grad.data_ptr<T>(), *xp = x.data_ptr<T>(), *r = reference.data_ptr<T>();
    const T *t = tau.data_ptr<T>(), *lg = logits ? logit_grad->data_ptr<T>() : nullptr;
    const T *s = sc.data_ptr<T>(), *a = sl.data_ptr<T>(), *b = of.data_ptr<T>();
    const T *a2 = logits ? sl2.data_ptr<T>() : nullptr, *b2 = logits ? of2.data_ptr<T>() : nullptr;
    T* out = grad_x.data_ptr<T>();
    at::parallel_for(0, N, sample_grain(C * L), [&](int64_t begin, int64_t end) {
      std::vector<T> gain(L), slope_l(L), offset_l(L);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          std::fill(gain.begin(), gain.end(), T(0));
          std::fill(slope_l.begin(), slope_l.end(), T(0));
          std::fill(offset_l.begin(), offset_l.end(), T(0));
          for (int64_t k = 0; k < K; ++k) {
            const T* tk = t + (n * K + k) * L;
            const T sk = s[k * C + c], ak = a[k * C + c], bk = b[k * C + c];
_Pragma("omp simd")
            for (int64_t l = 0; l < L; ++l) {
              gain[l] += tk[l] * sk;
              slope_l[l] += tk[l] * ak;
              offset_l[l] += tk[l] * bk;
            }
            if (lg != nullptr) {
              const T* gk = lg + (n * K + k) * L;
              const T a2k = a2[k * C + c], b2k = b2[k * C + c];
_Pragma("omp simd")
              for (int64_t l = 0; l < L; ++l) {
                slope_l[l] += gk[l] * a2k;
                offset_l[l] += gk[l] * b2k;
              }
            }
          }
          const T* row = xp + (n * C + c) * L;
          const T* g = gp + (n * C + c) * L;
          T* o = out + (n * C + c) * L;
          const T rc = r[c];
_Pragma("omp simd")
          for (int64_t l = 0; l < L; ++l)
            o[l] = g[l] * gain[l] + (row[l] - rc) * slope_l[l] + offset_l[l];
        }
      }
    });
  });
  return grad_x;
}

void register_mixture(pybind11::module& m) {
  m.def("mixture_logits", &mixture_logits);
  m.def("mixture_sums", &mixture_sums);
  m.def("mixture_output", &mixture_output);
  m.def("mixture_output_backward", &mixture_output_backward);
  m.def("mixture_input_grad", &mixture_input_grad);
}

}  // namespace contextnorm
