// Native CPU kernels of the supervised context layers' steps with known context ids:
// context_batch_norm (CN in training), context_affine (CN in eval) and learned_context_affine
// (CN-X, CN-E); the module also carries the mixture layers' passes (native_mixture.cpp).
//
// They compute what contextnorm/functional/context.py computes (that module is the reference,
// and the implementation on every other device, dtype and in traced graphs). On small inputs
// the PyTorch composition is bound by the cost of launching its ~40 operations and of a Python
// autograd node; here each step is one pass per channel over the activations for the
// statistics and one for the output, and a C++ autograd node.
//
// Layout: x (N, C, L) contiguous, ids (N,) int64 in [0, K) (checked where they entered), every
// floating-point tensor of one dtype (float32 or float64). Per-row sums are taken in that dtype
// (as BatchNorm's CPU kernel does) and summed over the rows of a context in double.

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace contextnorm {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = c10::optional<Tensor>;

const Tensor* given(const OptionalTensor& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// The per-context tables (gain, weight, bias, statistics) are small: a contiguous copy of a
// strided one costs little. The caller checked their dtype; a tensor on another device is an
// error, as in any PyTorch operation.
Tensor contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "contextnorm's native kernels got ", name, " on ", t.device(),
              " with the input on the CPU; put the layer and its input on one device");
  return t.contiguous();
}

OptionalTensor contiguous(const OptionalTensor& t, const char* name) {
  return given(t) ? OptionalTensor(contiguous(*t, name)) : OptionalTensor();
}

template <typename T>
const T* data_or_null(const OptionalTensor& t) {
  return given(t) ? given(t)->data_ptr<T>() : nullptr;
}

// Row stride of a per-context (K, C) tensor, 0 for one shared across contexts (C,).
int64_t row_stride(const OptionalTensor& t, int64_t channels) {
  return given(t) && given(t)->dim() == 2 ? channels : 0;
}

// Channels per task of at::parallel_for: about GRAIN_SIZE values each.
int64_t grain(int64_t values_per_channel) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, values_per_channel));
}

template <typename T>
T row_sum(const T* p, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

template <typename T>
T row_squared_deviation(const T* p, int64_t n, T m) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += (p[i] - m) * (p[i] - m);
  return s;
}

// sum_l g and sum_l g * (x - m) of one row.
template <typename T>
void row_gradient_sums(const T* g, const T* x, int64_t n, T m, T& sum, T& centred) {
  T s = 0, sc = 0;
#pragma omp simd reduction(+ : s, sc)
  for (int64_t i = 0; i < n; ++i) {
    s += g[i];
    sc += g[i] * (x[i] - m);
  }
  sum = s;
  centred = sc;
}

// The per-context table (K, C) of a step: mean, var, root = 1 / sqrt(var + eps), scale = root *
// gain, full_scale = scale * weight, shift = bias - mean * full_scale. One (6, K, C) tensor.
enum Row { kMean, kVar, kRoot, kScale, kFullScale, kShift, kRows };

// The table's coefficient rows from its mean and var rows, for the contexts `rows` (those of the
// batch: the others' coefficients are never read).
template <typename T>
void fill_coefficients(T* table, const std::vector<int64_t>& rows, int64_t K, int64_t C,
                       double eps, const T* gain, const T* weight, int64_t weight_stride,
                       const T* bias, int64_t bias_stride) {
  const int64_t plane = K * C;
  const T e = static_cast<T>(eps);
  for (const int64_t k : rows) {
    const T g = gain ? gain[k] : T(1);
    const T* w = weight ? weight + k * weight_stride : nullptr;
    const T* b = bias ? bias + k * bias_stride : nullptr;
    T* row = table + k * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T root = T(1) / std::sqrt(row[kVar * plane + c] + e);
      const T scale = root * g;
      const T full_scale = w ? scale * w[c] : scale;
      row[kRoot * plane + c] = root;
      row[kScale * plane + c] = scale;
      row[kFullScale * plane + c] = full_scale;
      row[kShift * plane + c] = (b ? b[c] : T(0)) - row[kMean * plane + c] * full_scale;
    }
  }
}

// The contexts that hold a sample of the batch, in increasing order: the per-channel loops over
// contexts visit these only, so their cost does not grow with K (a batch holds at most N).
std::vector<int64_t> present_contexts(const int64_t* ids, int64_t N, int64_t K) {
  std::vector<char> seen(K, 0);
  for (int64_t n = 0; n < N; ++n) seen[ids[n]] = 1;
  std::vector<int64_t> present;
  for (int64_t k = 0; k < K; ++k) {
    if (seen[k]) present.push_back(k);
  }
  return present;
}

// ---------------------------------------------------------------------------------------------
// context_batch_norm: per-context batch statistics (two passes), then the affine map.

// The mean and var rows of `table` (zero for the contexts without data: the running update skips
// them), then its coefficients, then the output.
template <typename T>
void batch_norm_forward(const T* x, const int64_t* ids, const std::vector<int64_t>& present,
                        int64_t N, int64_t C, int64_t L, int64_t K, double eps, const T* gain,
                        const T* weight, int64_t weight_stride, const T* bias,
                        int64_t bias_stride, const T* count, T* table, T* y) {
  const int64_t plane = K * C;
  T* mean = table + kMean * plane;
  T* var = table + kVar * plane;
  std::fill(mean, mean + 2 * plane, T(0));
  at::parallel_for(0, C, grain(N * L), [&](int64_t begin, int64_t end) {
    std::vector<double> sums(K);
    for (int64_t c = begin; c < end; ++c) {
      for (const int64_t k : present) sums[k] = 0.0;
      for (int64_t n = 0; n < N; ++n) sums[ids[n]] += row_sum(x + (n * C + c) * L, L);
      for (const int64_t k : present) mean[k * C + c] = static_cast<T>(sums[k] / count[k]);
      for (const int64_t k : present) sums[k] = 0.0;
      for (int64_t n = 0; n < N; ++n)
        sums[ids[n]] += row_squared_deviation(x + (n * C + c) * L, L, mean[ids[n] * C + c]);
      for (const int64_t k : present) var[k * C + c] = static_cast<T>(sums[k] / count[k]);
    }
  });
  fill_coefficients(table, present, K, C, eps, gain, weight, weight_stride, bias, bias_stride);
  at::parallel_for(0, C, grain(N * L), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t i = ids[n] * C + c;
        const T m = mean[i], s = table[kFullScale * plane + i];
        const T b = bias ? bias[ids[n] * bias_stride + c] : T(0);
        const T* in = x + (n * C + c) * L;
        T* out = y + (n * C + c) * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) out[l] = (in[l] - m) * s + b;
      }
    }
  });
}

// BatchNorm's backward per context, and the per-context sums of g and g * (x - mean) (2, K, C),
// which must come zeroed.
template <typename T>
void batch_norm_backward(const T* g, const T* x, const int64_t* ids,
                         const std::vector<int64_t>& present, int64_t N, int64_t C, int64_t L,
                         int64_t K, const T* table, const T* count, T* grad_x, T* sums) {
  const int64_t plane = K * C;
  const T* mean = table + kMean * plane;
  at::parallel_for(0, C, grain(N * L), [&](int64_t begin, int64_t end) {
    std::vector<double> shift(K), centred(K);
    std::vector<T> slope(K), offset(K);
    for (int64_t c = begin; c < end; ++c) {
      for (const int64_t k : present) shift[k] = centred[k] = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        T s, sc;
        const int64_t row = (n * C + c) * L;
        row_gradient_sums(g + row, x + row, L, mean[ids[n] * C + c], s, sc);
        shift[ids[n]] += s;
        centred[ids[n]] += sc;
      }
      for (const int64_t k : present) {
        const int64_t i = k * C + c;
        sums[i] = static_cast<T>(shift[k]);
        sums[plane + i] = static_cast<T>(centred[k]);
        // full_scale * (g - E[g] - x_hat * E[g * x_hat]) per context, as coefficients of g,
        // (x - mean) and 1.
        const double full_scale = table[kFullScale * plane + i];
        const double root = table[kRoot * plane + i];
        slope[k] = static_cast<T>(full_scale * root * root * centred[k] / count[k]);
        offset[k] = static_cast<T>(full_scale * shift[k] / count[k]);
      }
      if (grad_x == nullptr) continue;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t k = ids[n], i = k * C + c, row = (n * C + c) * L;
        const T m = mean[i], s = table[kFullScale * plane + i], sl = slope[k], of = offset[k];
#pragma omp simd
        for (int64_t l = 0; l < L; ++l)
          grad_x[row + l] = g[row + l] * s - (x[row + l] - m) * sl - of;
      }
    }
  });
}

// BatchNorm's running update per context, for the contexts with data in the batch: the variance
// stored unbiased; momentum < 0 is the cumulative average 1 / (batches counted for the context).
template <typename T>
void update_running(T* running_mean, T* running_var, int64_t* batches, const T* table,
                    const T* count, const std::vector<int64_t>& present, int64_t K, int64_t C,
                    double momentum) {
  const int64_t plane = K * C;
  for (const int64_t k : present) {
    if (batches != nullptr) batches[k] += 1;
    const double rate =
        momentum >= 0 ? momentum : 1.0 / static_cast<double>(std::max<int64_t>(batches[k], 1));
    const double correction = count[k] > 1 ? count[k] / (count[k] - 1.0) : 1.0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      running_mean[i] =
          static_cast<T>((1.0 - rate) * running_mean[i] + rate * table[kMean * plane + i]);
      running_var[i] = static_cast<T>((1.0 - rate) * running_var[i] +
                                      rate * correction * table[kVar * plane + i]);
    }
  }
}

// Checks that keep the kernels' memory accesses in bounds (ids in range, table shapes); the
// layers checked their contexts already, so these fail only for direct calls with bad input.
void check_arguments(const Tensor& x, const Tensor& ids, int64_t K,
                     std::initializer_list<std::pair<const char*, const OptionalTensor*>> tables) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous (N, C, L) tensor");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == N &&
                  ids.device().is_cpu(),
              "ids must be an int64 CPU tensor of shape (N,) = (", N, ",)");
  const auto ids_ = ids.contiguous();
  const int64_t* id = ids_.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(id[n] >= 0 && id[n] < K, "context ids must lie in [0, ", K, "), got ", id[n]);
  }
  for (const auto& [name, tensor] : tables) {
    const Tensor* t = given(*tensor);
    if (t == nullptr) continue;
    const bool gain = std::string(name) == "gain";
    const int64_t columns = gain ? 1 : C;
    TORCH_CHECK((t->dim() == 2 && t->size(0) == K && t->size(1) == columns) ||
                    (!gain && t->dim() == 1 && t->size(0) == C),
                name, " must have shape (", K, ", ", columns, ")", gain ? "" : " or (C,)",
                ", got ", t->sizes());
  }
}

// Gradients of the small inputs from the per-context sums of g (sums[0]) and of g * (x - mean)
// (sums[1]): weight and bias, per context (K, C) or summed over contexts when shared (C,), and the
// statistics given to context_affine: y = (x - mean) * root * scale_factors + bias, with
// d root / d var = -root^3 / 2. An output is skipped when its tensor is undefined; only the
// contexts `rows` (those of the batch) are written: the others' gradients must come zeroed.
template <typename T>
void table_gradients(const T* sums, const T* table, const std::vector<int64_t>& rows,
                     const T* weight, int64_t weight_stride, int64_t K, int64_t C,
                     Tensor& grad_weight, Tensor& grad_bias, Tensor& grad_mean, Tensor& grad_var) {
  const int64_t plane = K * C;
  T* gw = grad_weight.defined() ? grad_weight.data_ptr<T>() : nullptr;
  T* gb = grad_bias.defined() ? grad_bias.data_ptr<T>() : nullptr;
  T* gm = grad_mean.defined() ? grad_mean.data_ptr<T>() : nullptr;
  T* gv = grad_var.defined() ? grad_var.data_ptr<T>() : nullptr;
  // The statistics' gradients may be laid out as their inputs were (see layout_of).
  const int64_t m0 = gm ? grad_mean.stride(0) : 0, m1 = gm ? grad_mean.stride(1) : 0;
  const int64_t v0 = gv ? grad_var.stride(0) : 0, v1 = gv ? grad_var.stride(1) : 0;
  const bool weight_rows = gw && grad_weight.dim() == 2, bias_rows = gb && grad_bias.dim() == 2;
  for (const int64_t k : rows) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = k * C + c;
      const T shift = sums[i], centred = sums[plane + i];
      const T scale = table[kScale * plane + i], root = table[kRoot * plane + i];
      if (gw) gw[weight_rows ? i : c] += centred * scale;
      if (gb) gb[bias_rows ? i : c] += shift;
      if (gm) gm[k * m0 + c * m1] = -shift * table[kFullScale * plane + i];
      if (gv) {
        const T w = weight ? weight[k * weight_stride + c] : T(1);
        gv[k * v0 + c * v1] = centred * w * scale * root * root * T(-0.5);
      }
    }
  }
}

// A zero gradient shaped as the argument it belongs to, if autograd needs it.
Tensor gradient_for(bool needed, const Tensor& like) {
  return needed ? at::zeros_like(like, at::MemoryFormat::Contiguous) : Tensor();
}

// Whether a (K, C) statistic came as the transpose of a contiguous (C, K) tensor (CN-E's
// encoder weights): its gradient is then made in that layout, so that the parameter receives it
// without a copy.
bool transposed(const Tensor& t) {
  return t.dim() == 2 && t.size(0) > 1 && t.stride(0) == 1 && t.stride(1) == t.size(0);
}

// A zero (K, C) gradient for a statistic, laid out as `transposed` recorded.
Tensor statistic_gradient(bool needed, bool in_transpose, int64_t K, int64_t C,
                          const at::TensorOptions& options) {
  if (!needed) return Tensor();
  return in_transpose ? at::zeros({C, K}, options).t() : at::zeros({K, C}, options);
}

// Edge (index among the tensor arguments given) of each optional argument, -1 when absent:
// autograd numbers the inputs it tracks without the absent ones.
void record_edges(AutogradContext* ctx, int64_t first,
                  std::initializer_list<std::pair<const char*, const OptionalTensor*>> optional) {
  int64_t edge = first;
  for (const auto& [name, tensor] : optional) {
    ctx->saved_data[name] = given(*tensor) ? edge++ : -1;
  }
}

bool needs(AutogradContext* ctx, const char* name) {
  const int64_t edge = ctx->saved_data[name].toInt();
  return edge >= 0 && ctx->needs_input_grad(edge);
}

// The backward computes no graph of its own: as PyTorch's once_differentiable does, gradients
// computed with create_graph=True get a node that raises if they are differentiated again.
variable_list once_differentiable(variable_list out, const variable_list& grads) {
  const bool tracked = std::any_of(grads.begin(), grads.end(), [](const Tensor& g) {
    return g.defined() && g.requires_grad();
  });
  if (!at::GradMode::is_enabled() || !tracked) return out;
  for (auto& tensor : out) {
    if (tensor.defined()) tensor = tensor.detach().requires_grad_(true);
  }
  torch::autograd::DelayedError error(
      "trying to differentiate twice a function that was marked with @once_differentiable: the "
      "native backward of contextnorm's context layers is not differentiable (set "
      "CONTEXTNORM_NATIVE=0 for the PyTorch implementation, which is not either)",
      static_cast<int64_t>(out.size()));
  return error.apply(std::move(out));
}

struct ContextBatchNorm : public torch::autograd::Function<ContextBatchNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& ids,
                               int64_t num_contexts, double eps, const OptionalTensor& gain,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& running_mean,
                               const OptionalTensor& running_var,
                               const OptionalTensor& num_batches_tracked, double momentum) {
    check_arguments(x, ids, num_contexts, {{"gain", &gain}, {"weight", &weight}, {"bias", &bias}});
    const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = num_contexts;
    for (const auto* running : {&running_mean, &running_var}) {
      TORCH_CHECK(!given(*running) || (given(*running)->device().is_cpu() &&
                                       given(*running)->is_contiguous() &&
                                       given(*running)->numel() == K * C),
                  "running_mean and running_var must be contiguous (K, C) CPU tensors");
    }
    TORCH_CHECK(!given(num_batches_tracked) ||
                    (num_batches_tracked->scalar_type() == at::kLong &&
                     num_batches_tracked->is_contiguous() && num_batches_tracked->numel() == K),
                "num_batches_tracked must be a contiguous int64 tensor of shape (K,)");
    TORCH_CHECK(momentum >= 0 || given(num_batches_tracked),
                "momentum=None (the cumulative average) needs num_batches_tracked");
    const auto gain_ = contiguous(gain, "gain"), weight_ = contiguous(weight, "weight"),
               bias_ = contiguous(bias, "bias");
    auto count = at::zeros({K}, x.options());
    auto table = at::empty({kRows, K, C}, x.options());
    auto y = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "context_batch_norm", [&] {
      const int64_t* id = ids.data_ptr<int64_t>();
      scalar_t* counts = count.data_ptr<scalar_t>();
      for (int64_t n = 0; n < N; ++n) counts[id[n]] += static_cast<scalar_t>(L);
      const auto present = present_contexts(id, N, K);
      batch_norm_forward<scalar_t>(
          x.data_ptr<scalar_t>(), id, present, N, C, L, K, eps, data_or_null<scalar_t>(gain_),
          data_or_null<scalar_t>(weight_), row_stride(weight, C), data_or_null<scalar_t>(bias_),
          row_stride(bias, C), counts, table.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
      if (given(running_mean) != nullptr) {
        update_running<scalar_t>(running_mean->data_ptr<scalar_t>(),
                                 running_var->data_ptr<scalar_t>(),
                                 given(num_batches_tracked) != nullptr
                                     ? num_batches_tracked->data_ptr<int64_t>()
                                     : nullptr,
                                 table.data_ptr<scalar_t>(), counts, present, K, C, momentum);
      }
    });
    ctx->save_for_backward({x, ids, table, count, given(weight) ? *weight : Tensor(),
                            given(bias) ? *bias : Tensor()});
    record_edges(ctx, 2, {{"gain", &gain}, {"weight", &weight}, {"bias", &bias}});
    auto mean = table[kMean], var = table[kVar];
    ctx->mark_non_differentiable({mean, var, count});
    return {y, mean, var, count};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out;
    {
      at::NoGradGuard no_grad;
      out = gradients(ctx, grads);
    }
    return once_differentiable(std::move(out), grads);
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &ids = saved[1], &table = saved[2], &count = saved[3];
    const Tensor &weight = saved[4], &bias = saved[5];
    variable_list out(11);
    if (!grads[0].defined()) return out;
    const auto g = grads[0].contiguous();
    const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = count.size(0);
    Tensor grad_x = ctx->needs_input_grad(0) ? at::empty_like(x) : Tensor();
    Tensor grad_weight = gradient_for(needs(ctx, "weight"), weight);
    Tensor grad_bias = gradient_for(needs(ctx, "bias"), bias);
    Tensor none;
    auto sums = at::zeros({2, K, C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "context_batch_norm_backward", [&] {
      const int64_t* id = ids.data_ptr<int64_t>();
      const auto present = present_contexts(id, N, K);
      batch_norm_backward<scalar_t>(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), id, present, N, C, L, K,
          table.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(),
          grad_x.defined() ? grad_x.data_ptr<scalar_t>() : nullptr, sums.data_ptr<scalar_t>());
      table_gradients<scalar_t>(sums.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), present,
                                nullptr, 0, K, C, grad_weight, grad_bias, none, none);
    });
    out[0] = grad_x;
    out[5] = grad_weight;
    out[6] = grad_bias;
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// context_affine: y = x * full_scale[k] + shift[k] with given statistics.

template <typename T>
void affine_forward(const T* x, const int64_t* ids, int64_t N, int64_t C, int64_t L, int64_t K,
                    const T* table, T* y) {
  const int64_t plane = K * C;
  at::parallel_for(0, N * C, grain(L), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = ids[r / C] * C + r % C;
      const T s = table[kFullScale * plane + i], b = table[kShift * plane + i];
      const T* in = x + r * L;
      T* out = y + r * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) out[l] = in[l] * s + b;
    }
  });
}

// Per-context sums of g and g * (x - mean) (2, K, C), which must come zeroed, and
// grad_x = g * full_scale[k].
template <typename T>
void affine_backward(const T* g, const T* x, const int64_t* ids,
                     const std::vector<int64_t>& present, int64_t N, int64_t C, int64_t L,
                     int64_t K, const T* table, T* grad_x, T* sums) {
  const int64_t plane = K * C;
  const T* mean = table + kMean * plane;
  at::parallel_for(0, C, grain(N * L), [&](int64_t begin, int64_t end) {
    std::vector<double> shift(K), centred(K);
    for (int64_t c = begin; c < end; ++c) {
      for (const int64_t k : present) shift[k] = centred[k] = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        T s, sc;
        const int64_t i = ids[n] * C + c, row = (n * C + c) * L;
        row_gradient_sums(g + row, x + row, L, mean[i], s, sc);
        shift[ids[n]] += s;
        centred[ids[n]] += sc;
        if (grad_x != nullptr) {
          const T f = table[kFullScale * plane + i];
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) grad_x[row + l] = g[row + l] * f;
        }
      }
      for (const int64_t k : present) {
        sums[k * C + c] = static_cast<T>(shift[k]);
        sums[plane + k * C + c] = static_cast<T>(centred[k]);
      }
    }
  });
}

// The output of the affine steps once the table's mean and var rows are filled.
Tensor affine_output(const Tensor& x, const Tensor& ids, Tensor& table, double eps,
                     const OptionalTensor& gain, const OptionalTensor& weight,
                     const OptionalTensor& bias) {
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = table.size(1);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "context_affine", [&] {
    scalar_t* t = table.data_ptr<scalar_t>();
    fill_coefficients(t, present_contexts(ids.data_ptr<int64_t>(), N, K), K, C, eps,
                      data_or_null<scalar_t>(gain), data_or_null<scalar_t>(weight),
                      row_stride(weight, C), data_or_null<scalar_t>(bias), row_stride(bias, C));
    affine_forward<scalar_t>(x.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), N, C, L, K, t,
                             y.data_ptr<scalar_t>());
  });
  return y;
}

// What both affine steps save: the input, the ids, the table, the weight and bias they used.
void save_affine(AutogradContext* ctx, const Tensor& x, const Tensor& ids, const Tensor& table,
                 const OptionalTensor& weight, const OptionalTensor& bias) {
  ctx->save_for_backward(
      {x, ids, table, given(weight) ? *weight : Tensor(), given(bias) ? *bias : Tensor()});
}

struct AffineGradients {
  Tensor x, mean, var, weight, bias;
};

// The affine steps' backward: the input's gradient and those of the table's mean and var rows
// (when asked for), weight and bias.
// ``saved``: the context's saved variables, unpacked once (activation checkpointing allows one
// unpacking per backward).
AffineGradients affine_gradients(AutogradContext* ctx, const variable_list& saved,
                                 const Tensor& grad, bool need_mean, bool need_var) {
  const bool mean_t = ctx->saved_data["mean_transposed"].toBool();
  const bool var_t = ctx->saved_data["var_transposed"].toBool();
  const Tensor &x = saved[0], &ids = saved[1], &table = saved[2], &weight = saved[3];
  const Tensor& bias = saved[4];
  const auto g = grad.contiguous();
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), K = table.size(1);
  AffineGradients out;
  out.x = ctx->needs_input_grad(0) ? at::empty_like(x) : Tensor();
  out.weight = gradient_for(needs(ctx, "weight"), weight);
  out.bias = gradient_for(needs(ctx, "bias"), bias);
  out.mean = statistic_gradient(need_mean, mean_t, K, C, x.options());
  out.var = statistic_gradient(need_var, var_t, K, C, x.options());
  auto sums = at::zeros({2, K, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "context_affine_backward", [&] {
    const int64_t* id = ids.data_ptr<int64_t>();
    const auto present = present_contexts(id, N, K);
    affine_backward<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), id, present, N, C,
                              L, K, table.data_ptr<scalar_t>(),
                              out.x.defined() ? out.x.data_ptr<scalar_t>() : nullptr,
                              sums.data_ptr<scalar_t>());
    table_gradients<scalar_t>(sums.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(), present,
                              weight.defined() ? weight.data_ptr<scalar_t>() : nullptr,
                              weight.defined() && weight.dim() == 2 ? C : 0, K, C, out.weight,
                              out.bias, out.mean, out.var);
  });
  return out;
}

struct ContextAffine : public torch::autograd::Function<ContextAffine> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& ids,
                        const Tensor& mean, const Tensor& var, double eps,
                        const OptionalTensor& gain, const OptionalTensor& weight,
                        const OptionalTensor& bias) {
    TORCH_CHECK(mean.dim() == 2 && var.sizes() == mean.sizes() && mean.size(1) == x.size(1),
                "mean and var must have shape (K, C) with C = ", x.size(1));
    check_arguments(x, ids, mean.size(0), {{"gain", &gain}, {"weight", &weight}, {"bias", &bias}});
    const int64_t C = x.size(1), K = mean.size(0);
    const auto weight_ = contiguous(weight, "weight"), bias_ = contiguous(bias, "bias");
    auto table = at::empty({kRows, K, C}, x.options());
    table[kMean].copy_(contiguous(mean, "mean"));
    table[kVar].copy_(contiguous(var, "var"));
    auto y = affine_output(x, ids, table, eps, contiguous(gain, "gain"), weight_, bias_);
    save_affine(ctx, x, ids, table, weight_, bias_);
    record_edges(ctx, 4, {{"gain", &gain}, {"weight", &weight}, {"bias", &bias}});
    ctx->saved_data["mean_transposed"] = transposed(mean);
    ctx->saved_data["var_transposed"] = transposed(var);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (grads[0].defined()) {
      at::NoGradGuard no_grad;
      auto g = affine_gradients(ctx, ctx->get_saved_variables(), grads[0],
                                ctx->needs_input_grad(2), ctx->needs_input_grad(3));
      out[0] = g.x;
      out[2] = g.mean;
      out[3] = g.var;
      out[6] = g.weight;
      out[7] = g.bias;
    }
    return once_differentiable(std::move(out), grads);
  }
};

// Learned statistics: mean = mean_rows + mean_offset, std = softplus(raw_rows + raw_offset) with
// PyTorch's softplus (beta 1, linear above 20), var = std^2; the offsets (C,) are shared by the
// contexts and optional. The table gets one more row: d var / d raw = 2 std sigmoid(raw).
constexpr int64_t kVarSlope = kRows;

struct LearnedContextAffine : public torch::autograd::Function<LearnedContextAffine> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& ids,
                        const Tensor& mean, const Tensor& raw_std, double eps,
                        const OptionalTensor& gain, const OptionalTensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& mean_offset,
                        const OptionalTensor& raw_std_offset) {
    TORCH_CHECK(mean.dim() == 2 && raw_std.sizes() == mean.sizes() && mean.size(1) == x.size(1),
                "mean and raw_std must have shape (K, C) with C = ", x.size(1));
    const int64_t C = x.size(1), K = mean.size(0);
    for (const auto* offset : {&mean_offset, &raw_std_offset}) {
      TORCH_CHECK(!given(*offset) || (given(*offset)->dim() == 1 && given(*offset)->size(0) == C),
                  "mean_offset and raw_std_offset must have shape (C,) = (", C, ",)");
    }
    check_arguments(x, ids, K, {{"gain", &gain}, {"weight", &weight}, {"bias", &bias}});
    const auto weight_ = contiguous(weight, "weight"), bias_ = contiguous(bias, "bias");
    auto table = at::empty({kRows + 1, K, C}, x.options());
    TORCH_CHECK(mean.device().is_cpu() && raw_std.device().is_cpu(),
                "contextnorm's native kernels got mean or raw_std off the CPU with the input on it");
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "learned_context_affine", [&] {
      using T = scalar_t;
      // Read through their strides (CN-E passes its encoders' transposed weights): only the
      // rows of the contexts in the batch are read, and only theirs are written; the other
      // rows of the table are never read, and there can be thousands of them.
      const auto m = mean.accessor<T, 2>(), r = raw_std.accessor<T, 2>();
      const auto mo = contiguous(mean_offset, "mean_offset");
      const auto ro = contiguous(raw_std_offset, "raw_std_offset");
      const T *mop = data_or_null<T>(mo), *rop = data_or_null<T>(ro);
      T* t = table.data_ptr<T>();
      const int64_t plane = K * C;
      for (const int64_t k : present_contexts(ids.data_ptr<int64_t>(), x.size(0), K)) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = k * C + c;
          const T raw = r[k][c] + (rop ? rop[c] : T(0));
          const T exp = std::exp(std::min(raw, T(20)));
          const T std = raw > T(20) ? raw : std::log1p(exp);
          const T slope = raw > T(20) ? T(1) : exp / (T(1) + exp);
          t[kMean * plane + i] = m[k][c] + (mop ? mop[c] : T(0));
          t[kVar * plane + i] = std * std;
          t[kVarSlope * plane + i] = T(2) * std * slope;
        }
      }
    });
    auto y = affine_output(x, ids, table, eps, contiguous(gain, "gain"), weight_, bias_);
    save_affine(ctx, x, ids, table, weight_, bias_);
    ctx->saved_data["mean_transposed"] = transposed(mean);
    ctx->saved_data["var_transposed"] = transposed(raw_std);
    record_edges(ctx, 4,
                 {{"gain", &gain},
                  {"weight", &weight},
                  {"bias", &bias},
                  {"mean_offset", &mean_offset},
                  {"raw_std_offset", &raw_std_offset}});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(10);
    if (grads[0].defined()) {
      at::NoGradGuard no_grad;
      const bool need_mean = ctx->needs_input_grad(2) || needs(ctx, "mean_offset");
      const bool need_raw = ctx->needs_input_grad(3) || needs(ctx, "raw_std_offset");
      const auto saved = ctx->get_saved_variables();
      auto g = affine_gradients(ctx, saved, grads[0], need_mean, need_raw);
      const Tensor& table = saved[2];
      const int64_t K = table.size(1), C = table.size(2);
      Tensor mean_offset = needs(ctx, "mean_offset") ? at::zeros({C}, table.options()) : Tensor();
      Tensor raw_offset = needs(ctx, "raw_std_offset") ? at::zeros({C}, table.options()) : Tensor();
      AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "learned_context_affine_backward", [&] {
        using T = scalar_t;
        const T* slope = table.data_ptr<T>() + kVarSlope * K * C;
        T* gm = g.mean.defined() ? g.mean.data_ptr<T>() : nullptr;
        T* gv = g.var.defined() ? g.var.data_ptr<T>() : nullptr;
        T* mo = mean_offset.defined() ? mean_offset.data_ptr<T>() : nullptr;
        T* ro = raw_offset.defined() ? raw_offset.data_ptr<T>() : nullptr;
        // The other contexts' gradients are zero (affine_gradients zeroed them).
        const Tensor& ids = saved[1];
        const int64_t m0 = gm ? g.mean.stride(0) : 0, m1 = gm ? g.mean.stride(1) : 0;
        const int64_t v0 = gv ? g.var.stride(0) : 0, v1 = gv ? g.var.stride(1) : 0;
        for (const int64_t k : present_contexts(ids.data_ptr<int64_t>(), ids.size(0), K)) {
          for (int64_t c = 0; c < C; ++c) {
            if (gv) {
              T& grad_raw = gv[k * v0 + c * v1];
              grad_raw *= slope[k * C + c];  // from var's gradient to raw's
              if (ro) ro[c] += grad_raw;
            }
            if (mo) mo[c] += gm[k * m0 + c * m1];
          }
        }
      });
      out[0] = g.x;
      out[2] = ctx->needs_input_grad(2) ? g.mean : Tensor();
      out[3] = ctx->needs_input_grad(3) ? g.var : Tensor();
      out[6] = g.weight;
      out[7] = g.bias;
      out[8] = mean_offset;
      out[9] = raw_offset;
    }
    return once_differentiable(std::move(out), grads);
  }
};

variable_list context_batch_norm(const Tensor& x, const Tensor& ids, int64_t num_contexts,
                                 double eps, const OptionalTensor& gain,
                                 const OptionalTensor& weight, const OptionalTensor& bias,
                                 const OptionalTensor& running_mean,
                                 const OptionalTensor& running_var,
                                 const OptionalTensor& num_batches_tracked, double momentum) {
  return ContextBatchNorm::apply(x, ids, num_contexts, eps, gain, weight, bias, running_mean,
                                 running_var, num_batches_tracked, momentum);
}

Tensor learned_context_affine(const Tensor& x, const Tensor& ids, const Tensor& mean,
                              const Tensor& raw_std, double eps, const OptionalTensor& gain,
                              const OptionalTensor& weight, const OptionalTensor& bias,
                              const OptionalTensor& mean_offset,
                              const OptionalTensor& raw_std_offset) {
  return LearnedContextAffine::apply(x, ids, mean, raw_std, eps, gain, weight, bias, mean_offset,
                                     raw_std_offset);
}

Tensor context_affine(const Tensor& x, const Tensor& ids, const Tensor& mean, const Tensor& var,
                      double eps, const OptionalTensor& gain, const OptionalTensor& weight,
                      const OptionalTensor& bias) {
  return ContextAffine::apply(x, ids, mean, var, eps, gain, weight, bias);
}

// native_mixture.cpp: the mixture layers' passes.
void register_mixture(pybind11::module& m);

}  // namespace contextnorm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("context_batch_norm", &contextnorm::context_batch_norm);
  m.def("context_affine", &contextnorm::context_affine);
  m.def("learned_context_affine", &contextnorm::learned_context_affine);
  contextnorm::register_mixture(m);
}
