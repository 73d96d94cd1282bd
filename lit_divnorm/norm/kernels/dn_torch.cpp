// The C++ kernels of dn_cpu.cpp (this folder) as torch operators with their autograd in C++,
// so that an eager step on the CPU crosses no Python between the layer and the kernels:
//
//   lit_divnorm_cpu::local_dn(x, learned_floor, floor, sum_spec, sup_spec, with_l1, l1_weight)
//       -> [y] or [y, l1]           local DN over positional windows, (N, C, *P)
//   lit_divnorm_cpu::local_dn_forward / local_dn_backward
//       the two kernels alone (what the lit_divnorm::local_dn custom op calls under compile)
//   lit_divnorm_cpu::field_norm(x, learned_floor, floor, weight, bias, groups, centre, scale,
//                               with_l1) -> (y, l1, stats)
//       a field over whole groups of units (batch, layer, instance, group)
//
// The formulas and shapes are those of cpu.py's forward/backward and field_forward/
// field_backward; these functions only allocate the outputs, call the kernels' C entry points
// and wire the backward. `floor` is sigma^2 + eps; a learned one comes as the 0-d tensor
// `learned_floor` too (its value is read from there, and it gets a gradient). The L1 output is
// mean |x - m| (or |x - mu|; local_dn's is l1_weight * mean |x - m|, a layer's sparsity term
// without a multiplication node of its own), its gradient reaching x through the kernels' sign
// terms. Built
// into the same library as dn_cpu.cpp; registered by dn_register_ops() (called once from
// cpu.py) rather than at load, so that loading never throws.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#define DN_DECLARE(T, S)                                                                        \
  extern "C" double dn_forward_##S(const T* x, T* y, T* q1, T* m, T* r, int64_t n, int64_t c,  \
                                   int64_t ndim, const int64_t* dims, const int64_t* sum,      \
                                   const int64_t* sup, double floor, int with_l1, int threads); \
  extern "C" double dn_backward_##S(const T* g, const T* x, const T* q1, const T* m,           \
                                    const T* r, T* grad_x, int64_t n, int64_t c, int64_t ndim, \
                                    const int64_t* dims, const int64_t* sum, const int64_t* sup, \
                                    double coef, int with_l1, int threads);                    \
  extern "C" double dn_field_forward_##S(const T* x, T* y, T* stats, const T* w, const T* b,    \
                                         int64_t n, int64_t c, int64_t p, int64_t groups,       \
                                         int centre, int scale, double floor, int with_l1,      \
                                         int threads);                                          \
  extern "C" double dn_field_backward_##S(const T* g, const T* x, const T* stats, const T* w,   \
                                          T* grad_x, T* grad_w, T* grad_b, int64_t n,           \
                                          int64_t c, int64_t p, int64_t groups, int centre,     \
                                          int scale, double coef, int with_l1, int threads);

DN_DECLARE(float, f32)
DN_DECLARE(double, f64)

// One name per entry point, overloaded on the value type (what AT_DISPATCH's scalar_t picks).
#define DN_OVERLOAD(T, S)                                                                       \
  template <typename... A>                                                                     \
  inline double dn_forward(const T* x, A... a) { return dn_forward_##S(x, a...); }             \
  template <typename... A>                                                                     \
  inline double dn_backward(const T* g, A... a) { return dn_backward_##S(g, a...); }           \
  template <typename... A>                                                                     \
  inline double dn_field_forward(const T* x, A... a) { return dn_field_forward_##S(x, a...); } \
  template <typename... A>                                                                     \
  inline double dn_field_backward(const T* g, A... a) {                                        \
    return dn_field_backward_##S(g, a...);                                                     \
  }

DN_OVERLOAD(float, f32)
DN_OVERLOAD(double, f64)

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The layout the kernels' outputs keep: channels_last for such a 4-D input.
at::MemoryFormat layout_of(const Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

void check_input(const Tensor& x, const char* op, int64_t min_dims) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= min_dims, op, ": x must have at least ", min_dims,
              " dimensions (N, C, *P), got ", x.dim());
}

void check_once(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              " has no double backward (its backward is a C++ kernel); run it without "
              "create_graph=True");
}

template <typename T>
const T* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

double floor_value(const c10::optional<Tensor>& learned_floor, double floor) {
  return learned_floor.has_value() && learned_floor->defined()
             ? learned_floor->item<double>()
             : floor;
}

// Whether an optional input takes a gradient (ctx->needs_input_grad counts only the inputs
// present, so the forward records this itself).
bool needs_grad(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

void save_floor_dtype(AutogradContext* ctx, const c10::optional<Tensor>& learned_floor) {
  ctx->saved_data["floor_dtype"] =
      needs_grad(learned_floor) ? static_cast<int64_t>(learned_floor->scalar_type()) : -1;
}

// dL/dfloor for a learned floor that needs it, else undefined.
Tensor floor_grad(AutogradContext* ctx, double grad) {
  const int64_t dtype = ctx->saved_data["floor_dtype"].toInt();
  if (dtype < 0) return Tensor();
  return at::scalar_tensor(grad, at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)));
}

// ---- local DN ----

// (y, stats, l1_weight * mean |x - m|): stats (3, N, 1, *P) stacks q1, m, r.
std::tuple<Tensor, Tensor, Tensor> weighted_local_dn_forward(const Tensor& x_in, double floor,
                                                             at::IntArrayRef sum_spec,
                                                             at::IntArrayRef sup_spec,
                                                             bool with_l1, double l1_weight) {
  check_input(x_in, "local_dn_forward", 3);
  const at::MemoryFormat layout = layout_of(x_in);
  const Tensor x = x_in.contiguous();
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  std::vector<int64_t> stat_shape{3, x.size(0), 1};
  for (int64_t d = 2; d < x.dim(); ++d) stat_shape.push_back(x.size(d));
  Tensor stats = at::empty(stat_shape, x.options());
  const std::vector<int64_t> dims(x.sizes().begin() + 2, x.sizes().end());
  const int64_t ndim = static_cast<int64_t>(dims.size());
  const int64_t per = stats.numel() / 3;
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "local_dn_forward", [&] {
    scalar_t* s = stats.data_ptr<scalar_t>();
    total = dn_forward(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s, s + per, s + 2 * per,
                       x.size(0), x.size(1), ndim, dims.data(), sum_spec.data(), sup_spec.data(),
                       floor, with_l1 ? 1 : 0, at::get_num_threads());
  });
  const double mean = total / std::max<double>(x.numel(), 1);
  return {y.contiguous(layout), stats, at::scalar_tensor(l1_weight * mean, x.options())};
}

// The same with the plain mean |x - m| (the operator local_dn_forward).
std::tuple<Tensor, Tensor, Tensor> local_dn_forward(const Tensor& x, double floor,
                                                    at::IntArrayRef sum_spec,
                                                    at::IntArrayRef sup_spec, bool with_l1) {
  return weighted_local_dn_forward(x, floor, sum_spec, sup_spec, with_l1, 1.0);
}

// (dL/dx, dL/dfloor) from dL/dy and, when with_l1, the L1 term coef * sum |x - m|.
std::tuple<Tensor, Tensor> local_dn_backward(const Tensor& grad_y, const Tensor& x_in,
                                             const Tensor& stats, at::IntArrayRef sum_spec,
                                             at::IntArrayRef sup_spec, double coef,
                                             bool with_l1) {
  check_input(x_in, "local_dn_backward", 3);
  const at::MemoryFormat layout = layout_of(x_in);
  const Tensor x = x_in.contiguous();
  const Tensor g = grad_y.to(x.scalar_type()).contiguous();
  Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  const std::vector<int64_t> dims(x.sizes().begin() + 2, x.sizes().end());
  const int64_t ndim = static_cast<int64_t>(dims.size());
  const int64_t per = stats.numel() / 3;
  double grad_floor = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "local_dn_backward", [&] {
    const scalar_t* s = stats.data_ptr<scalar_t>();
    grad_floor = dn_backward(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), s, s + per,
                             s + 2 * per, grad_x.data_ptr<scalar_t>(), x.size(0), x.size(1), ndim,
                             dims.data(), sum_spec.data(), sup_spec.data(), coef,
                             with_l1 ? 1 : 0, at::get_num_threads());
  });
  return {grad_x.contiguous(layout), at::scalar_tensor(grad_floor, x.options())};
}

struct LocalDN : public torch::autograd::Function<LocalDN> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const c10::optional<Tensor>& learned_floor, double floor,
                               at::IntArrayRef sum_spec, at::IntArrayRef sup_spec, bool with_l1,
                               double l1_weight) {
    auto [y, stats, l1] = weighted_local_dn_forward(x, floor_value(learned_floor, floor), sum_spec,
                                                    sup_spec, with_l1, l1_weight);
    ctx->save_for_backward({x, stats});
    ctx->saved_data["sum"] = sum_spec.vec();
    ctx->saved_data["sup"] = sup_spec.vec();
    ctx->saved_data["l1_weight"] = l1_weight;
    save_floor_dtype(ctx, learned_floor);
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    if (!with_l1) return {y};
    return {y, l1};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_once("lit_divnorm_cpu::local_dn");
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const bool with_l1 = grads.size() > 1 && grads[1].defined();
    const double l1_weight = ctx->saved_data["l1_weight"].toDouble();
    const double coef = with_l1 ? grads[1].item<double>() * l1_weight /
                                      static_cast<double>(std::max<int64_t>(x.numel(), 1))
                                : 0.0;
    const Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [grad_x, grad_floor] =
        local_dn_backward(grad_y, x, saved[1], ctx->saved_data["sum"].toIntVector(),
                          ctx->saved_data["sup"].toIntVector(), coef, with_l1);
    return {grad_x, floor_grad(ctx, grad_floor.item<double>()), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

std::vector<Tensor> local_dn(const Tensor& x, const c10::optional<Tensor>& learned_floor,
                             double floor, at::IntArrayRef sum_spec, at::IntArrayRef sup_spec,
                             bool with_l1, double l1_weight) {
  return LocalDN::apply(x, learned_floor, floor, sum_spec, sup_spec, with_l1, l1_weight);
}

// ---- fields over whole groups of units ----

struct FieldNorm : public torch::autograd::Function<FieldNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x_in,
                               const c10::optional<Tensor>& learned_floor, double floor,
                               const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, int64_t groups, bool centre,
                               bool scale, bool with_l1) {
    check_input(x_in, "field_norm", 2);
    const at::MemoryFormat layout = layout_of(x_in);
    const Tensor x = x_in.contiguous();
    const int64_t n = x.size(0), c = x.size(1), p = x.numel() / std::max<int64_t>(n * c, 1);
    Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor stats = at::empty({3, groups == 0 ? c : n * groups}, x.options());
    const double value = floor_value(learned_floor, floor);
    double total = 0.0;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "field_norm", [&] {
      total = dn_field_forward(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                               stats.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(weight),
                               ptr_or_null<scalar_t>(bias), n, c, p, groups, centre ? 1 : 0,
                               scale ? 1 : 0, value, with_l1 ? 1 : 0, at::get_num_threads());
    });
    ctx->save_for_backward({x, stats, weight.value_or(Tensor())});
    const bool channels_last = layout == at::MemoryFormat::ChannelsLast;
    ctx->saved_data["args"] = std::vector<int64_t>{
        groups, centre, scale, with_l1, channels_last, needs_grad(weight), needs_grad(bias)};
    save_floor_dtype(ctx, learned_floor);
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);
    Tensor l1 = at::scalar_tensor(total / static_cast<double>(std::max<int64_t>(x.numel(), 1)),
                                  x.options());
    if (!with_l1) ctx->mark_non_differentiable({l1});
    return {y.contiguous(layout), l1, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_once("lit_divnorm_cpu::field_norm");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &stats = saved[1], &weight = saved[2];
    const auto args = ctx->saved_data["args"].toIntVector();
    const int64_t groups = args[0], n = x.size(0), c = x.size(1);
    const int64_t p = x.numel() / std::max<int64_t>(n * c, 1);
    const bool with_l1 = args[3] && grads[1].defined();
    const at::MemoryFormat layout =
        args[4] ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    const double coef =
        with_l1 ? grads[1].item<double>() / static_cast<double>(std::max<int64_t>(x.numel(), 1))
                : 0.0;
    const Tensor g = grads[0].defined() ? grads[0].to(x.scalar_type()).contiguous()
                                        : at::zeros_like(x);
    const bool weight_grad = args[5], bias_grad = args[6], affine = weight_grad || bias_grad;
    Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor grad_w = affine ? at::empty({c}, x.options()) : Tensor();
    Tensor grad_b = affine ? at::empty({c}, x.options()) : Tensor();
    double grad_floor = 0.0;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "field_norm_backward", [&] {
      auto opt = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      grad_floor = dn_field_backward(
          g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(),
          static_cast<const scalar_t*>(opt(weight)), grad_x.data_ptr<scalar_t>(), opt(grad_w),
          opt(grad_b), n, c, p, groups, static_cast<int>(args[1]), static_cast<int>(args[2]),
          coef, with_l1 ? 1 : 0, at::get_num_threads());
    });
    return {grad_x.contiguous(layout),
            floor_grad(ctx, grad_floor),
            Tensor(),
            weight_grad ? grad_w : Tensor(),
            bias_grad ? grad_b : Tensor(),
            Tensor(),
            Tensor(),
            Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> field_norm(const Tensor& x,
                                              const c10::optional<Tensor>& learned_floor,
                                              double floor, const c10::optional<Tensor>& weight,
                                              const c10::optional<Tensor>& bias, int64_t groups,
                                              bool centre, bool scale, bool with_l1) {
  auto out = FieldNorm::apply(x, learned_floor, floor, weight, bias, groups, centre, scale,
                              with_l1);
  return {out[0], out[1], out[2]};
}

}  // namespace

// Registers the operators (once per process; later calls do nothing). Returns 1 on success,
// 0 if torch refused the registration (the caller then keeps to the ctypes entry points).
extern "C" int dn_register_ops() {
  static int registered = 0;
  if (registered) return registered;
  try {
    auto* defs = new torch::Library(torch::Library::DEF, "lit_divnorm_cpu", std::nullopt,
                                    __FILE__, __LINE__);
    defs->def(
        "local_dn(Tensor x, Tensor? learned_floor, float floor, int[] sum_spec, int[] sup_spec, "
        "bool with_l1, float l1_weight=1.0) -> Tensor[]");
    defs->def(
        "local_dn_forward(Tensor x, float floor, int[] sum_spec, int[] sup_spec, bool with_l1) "
        "-> (Tensor, Tensor, Tensor)");
    defs->def(
        "local_dn_backward(Tensor grad_y, Tensor x, Tensor stats, int[] sum_spec, "
        "int[] sup_spec, float coef, bool with_l1) -> (Tensor, Tensor)");
    defs->def(
        "field_norm(Tensor x, Tensor? learned_floor, float floor, Tensor? weight, Tensor? bias, "
        "int groups, bool centre, bool scale, bool with_l1) -> (Tensor, Tensor, Tensor)");
    auto* impls = new torch::Library(torch::Library::IMPL, "lit_divnorm_cpu",
                                     c10::DispatchKey::CompositeImplicitAutograd, __FILE__,
                                     __LINE__);
    impls->impl("local_dn", &local_dn);
    impls->impl("local_dn_forward", &local_dn_forward);
    impls->impl("local_dn_backward", &local_dn_backward);
    impls->impl("field_norm", &field_norm);
    registered = 1;
  } catch (const std::exception&) {
    registered = 0;
  }
  return registered;
}
