// Fused divisive normalization over all channels and local positional windows, on the CPU.
// Built and loaded by lit_divnorm/norm/native.py; the formulas are those of fused.py:
//
//   q1 = mean_c x, q2 = mean_c x^2                  (per sample and position)
//   m  = A(q1),  e = B(q2 - q1^2 + (q1 - m)^2),  r = 1 / sqrt(e + floor)
//   y  = (x - m) r
//
// x, y, g and the input gradient are contiguous (N, C, P); q1, m and r are (N, P) with
// P = prod(dims). A and B are box means along each positional axis, by running sums in double
// (the cost does not grow with the window). Each sample is one task: its statistics pass and
// its output pass run back to back, so the second pass reads the sample's C x P values from
// cache rather than memory. Tasks are spread with OpenMP (the libgomp torch has loaded).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// One axis's window: positions j - before .. j + after; divided by `divisor`, or by the
// number of positions inside the axis when divisor is 0.
struct Window {
  int64_t before, after, divisor;
};

// The positional axes and, per axis and position, 1 / (the divisor of each window).
struct Geometry {
  std::vector<int64_t> dims;
  std::vector<Window> sum, sup;  // A and B, one window per axis
  std::vector<std::vector<double>> sum_scale, sup_scale;

  Geometry(int64_t ndim, const int64_t* lengths, const int64_t* sum_spec,
           const int64_t* sup_spec)
      : dims(lengths, lengths + ndim) {
    for (int64_t a = 0; a < ndim; ++a) {
      sum.push_back({sum_spec[3 * a], sum_spec[3 * a + 1], sum_spec[3 * a + 2]});
      sup.push_back({sup_spec[3 * a], sup_spec[3 * a + 1], sup_spec[3 * a + 2]});
      sum_scale.push_back(scales(dims[a], sum.back()));
      sup_scale.push_back(scales(dims[a], sup.back()));
    }
  }

  static std::vector<double> scales(int64_t len, const Window& w) {
    std::vector<double> scale(len);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t inside = std::min(len, j + w.after + 1) - std::max<int64_t>(0, j - w.before);
      scale[j] = 1.0 / static_cast<double>(w.divisor ? w.divisor : inside);
    }
    return scale;
  }

  int64_t positions() const {
    int64_t p = 1;
    for (int64_t len : dims) p *= len;
    return p;
  }

};

// In place: the box means along the middle axis of v viewed as (outer, len, inner), by running
// sums in double over whole rows of `inner` values (so the loops vectorize over `inner`).
// `prefix` holds (len + 1) * inner doubles.
template <typename T>
void box_axis(T* v, int64_t outer, int64_t len, int64_t inner, const Window& w,
              const double* scale, bool adjoint, double* prefix) {
  // Sums run over [j - lead, j + lag]; the adjoint swaps the sides and scales before summing.
  const int64_t lead = adjoint ? w.after : w.before;
  const int64_t lag = adjoint ? w.before : w.after;
  for (int64_t o = 0; o < outer; ++o) {
    T* block = v + o * len * inner;
    std::fill(prefix, prefix + inner, 0.0);
    for (int64_t j = 0; j < len; ++j) {
      const double factor = adjoint ? scale[j] : 1.0;
      const double* __restrict before = prefix + j * inner;
      double* __restrict after = prefix + (j + 1) * inner;
      const T* __restrict row = block + j * inner;
      for (int64_t i = 0; i < inner; ++i) after[i] = before[i] + factor * row[i];
    }
    for (int64_t j = 0; j < len; ++j) {
      const double factor = adjoint ? 1.0 : scale[j];
      const double* __restrict high = prefix + std::min(len, j + lag + 1) * inner;
      const double* __restrict low = prefix + std::max<int64_t>(0, j - lead) * inner;
      T* __restrict row = block + j * inner;
      for (int64_t i = 0; i < inner; ++i) row[i] = static_cast<T>((high[i] - low[i]) * factor);
    }
  }
}

// In place: v <- A v (or A^T v with adjoint), A the box means of `windows` along every axis.
// The last axis is box-filtered as the first axis of the transposed (len, rest) map, so that
// its running sums too vectorize. `prefix` holds 2P + 1 doubles and `spare` P values.
template <typename T>
void box(T* v, const Geometry& geo, const std::vector<Window>& windows,
         const std::vector<std::vector<double>>& scales, bool adjoint, double* prefix,
         T* spare) {
  const int64_t p = geo.positions();
  int64_t outer = 1;
  for (size_t a = 0; a < geo.dims.size(); ++a) {
    const int64_t len = geo.dims[a];
    const int64_t inner = p / outer / len;
    const double* scale = scales[a].data();
    if (inner > 1 || outer == 1) {
      box_axis(v, outer, len, inner, windows[a], scale, adjoint, prefix);
    } else {
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t j = 0; j < len; ++j) spare[j * outer + o] = v[o * len + j];
      box_axis(spare, 1, len, outer, windows[a], scale, adjoint, prefix);
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t j = 0; j < len; ++j) v[o * len + j] = spare[j * outer + o];
    }
    outer *= len;
  }
}

// a[j] = sum_c u[c, j] and b[j] = sum_c u[c, j] w[c, j] for the (c, p) rows u and w, streaming
// four rows at a time (the accumulator rows stay in cache and are stored once per four rows).
template <typename T>
void paired_sums(const T* u, const T* w, int64_t c, int64_t p, T* __restrict a, T* __restrict b) {
  std::fill(a, a + p, T(0));
  std::fill(b, b + p, T(0));
  int64_t ch = 0;
  for (; ch + 4 <= c; ch += 4) {
    const T* __restrict u0 = u + ch * p;
    const T* __restrict u1 = u0 + p;
    const T* __restrict u2 = u1 + p;
    const T* __restrict u3 = u2 + p;
    const T* __restrict w0 = w + ch * p;
    const T* __restrict w1 = w0 + p;
    const T* __restrict w2 = w1 + p;
    const T* __restrict w3 = w2 + p;
    for (int64_t j = 0; j < p; ++j) {
      a[j] += (u0[j] + u1[j]) + (u2[j] + u3[j]);
      b[j] += (u0[j] * w0[j] + u1[j] * w1[j]) + (u2[j] * w2[j] + u3[j] * w3[j]);
    }
  }
  for (; ch < c; ++ch) {
    const T* __restrict urow = u + ch * p;
    const T* __restrict wrow = w + ch * p;
    for (int64_t j = 0; j < p; ++j) {
      a[j] += urow[j];
      b[j] += urow[j] * wrow[j];
    }
  }
}

// The calling thread's scratch buffer number `slot` with room for `count` values, kept from
// call to call (OpenMP reuses its threads) so that no step allocates.
template <typename T>
T* scratch(int slot, int64_t count) {
  thread_local std::vector<T> buffers[3];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

template <typename T>
inline T sign_of(T v) {
  return static_cast<T>((v > 0) - (v < 0));
}

// y = (x - m) r, saving q1, m, r; returns sum |x - m| when with_l1 (else 0).
template <typename T>
double forward(const T* x, T* y, T* q1, T* m, T* r, int64_t n, int64_t c, const Geometry& geo,
               double floor, int with_l1, int threads) {
  const int64_t p = geo.positions();
  const T inv = T(1) / T(c);
  const T tfloor = static_cast<T>(floor);
  double l1 = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : l1)
  {
    T* square = scratch<T>(0, p);
    T* spare = scratch<T>(1, p);
    double* prefix = scratch<double>(2, 2 * p + 1);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const T* xs = x + s * c * p;
      T* ys = y + s * c * p;
      T* __restrict a = q1 + s * p;
      T* __restrict b = square;
      T* __restrict ms = m + s * p;
      T* __restrict rs = r + s * p;
      paired_sums(xs, xs, c, p, a, b);
      for (int64_t j = 0; j < p; ++j) {
        a[j] *= inv;
        ms[j] = a[j];
      }
      box(ms, geo, geo.sum, geo.sum_scale, false, prefix, spare);
      for (int64_t j = 0; j < p; ++j) {
        const T centre = a[j] - ms[j];
        b[j] = std::max(b[j] * inv - a[j] * a[j], T(0)) + centre * centre;
      }
      box(b, geo, geo.sup, geo.sup_scale, false, prefix, spare);
      for (int64_t j = 0; j < p; ++j) rs[j] = T(1) / std::sqrt(b[j] + tfloor);
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* __restrict row = xs + ch * p;
        T* __restrict out = ys + ch * p;
        if (!with_l1) {
          for (int64_t j = 0; j < p; ++j) out[j] = (row[j] - ms[j]) * rs[j];
          continue;
        }
        T partial = T(0);
#pragma omp simd reduction(+ : partial)
        for (int64_t j = 0; j < p; ++j) {
          const T v = row[j] - ms[j];
          out[j] = v * rs[j];
          partial += std::fabs(v);
        }
        l1 += static_cast<double>(partial);
      }
    }
  }
  return l1;
}

// The input gradient of y and, when with_l1, of coef * sum |x - m|; returns dL/dfloor.
template <typename T>
double backward(const T* g, const T* x, const T* q1, const T* m, const T* r, T* grad_x,
                int64_t n, int64_t c, const Geometry& geo, double coef, int with_l1,
                int threads) {
  const int64_t p = geo.positions();
  const T inv = T(1) / T(c);
  const T tc = static_cast<T>(c);
  const T tcoef = static_cast<T>(coef);
  double grad_floor = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : grad_floor)
  {
    T* sums = scratch<T>(0, 3 * p);
    T* spare = scratch<T>(1, p);
    double* prefix = scratch<double>(2, 2 * p + 1);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      std::fill(sums, sums + 3 * p, T(0));
      const T* gs = g + s * c * p;
      const T* xs = x + s * c * p;
      T* gxs = grad_x + s * c * p;
      const T* __restrict q = q1 + s * p;
      const T* __restrict ms = m + s * p;
      const T* __restrict rs = r + s * p;
      T* __restrict mg = sums;        // mean_c g, then dL/dm, then b
      T* __restrict mgx = mg + p;     // mean_c g x, then dL/de, then k
      T* __restrict msign = mgx + p;  // sum_c sign(x - m)
      paired_sums(gs, xs, c, p, mg, mgx);
      for (int64_t ch = 0; with_l1 && ch < c; ++ch) {
        const T* __restrict xrow = xs + ch * p;
        for (int64_t j = 0; j < p; ++j) msign[j] += sign_of(xrow[j] - ms[j]);
      }
      double floor_partial = 0.0;
      for (int64_t j = 0; j < p; ++j) {
        mg[j] *= inv;
        const T r3 = rs[j] * rs[j] * rs[j];
        mgx[j] = (mgx[j] * inv - ms[j] * mg[j]) * (T(-0.5) * tc * r3);
        floor_partial += static_cast<double>(mgx[j]);
      }
      grad_floor += floor_partial;
      box(mgx, geo, geo.sup, geo.sup_scale, true, prefix, spare);
      for (int64_t j = 0; j < p; ++j) {
        mgx[j] *= T(2) * inv;
        mg[j] = -tc * (rs[j] * mg[j] + mgx[j] * (q[j] - ms[j]));
        if (with_l1) mg[j] -= tcoef * msign[j];  // = c coef mean_c sign(x - m)
      }
      box(mg, geo, geo.sum, geo.sum_scale, true, prefix, spare);
      for (int64_t j = 0; j < p; ++j) mg[j] = mg[j] * inv - ms[j] * mgx[j];
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* __restrict grow = gs + ch * p;
        const T* __restrict xrow = xs + ch * p;
        T* __restrict out = gxs + ch * p;
        for (int64_t j = 0; j < p; ++j) out[j] = grow[j] * rs[j] + mgx[j] * xrow[j] + mg[j];
        if (with_l1)
          for (int64_t j = 0; j < p; ++j) out[j] += tcoef * sign_of(xrow[j] - ms[j]);
      }
    }
  }
  return grad_floor;
}

}  // namespace

#define DN_EXPORT(T, S)                                                                         \
  extern "C" double dn_forward_##S(const T* x, T* y, T* q1, T* m, T* r, int64_t n, int64_t c,  \
                                   int64_t ndim, const int64_t* dims, const int64_t* sum,      \
                                   const int64_t* sup, double floor, int with_l1,              \
                                   int threads) {                                              \
    return forward<T>(x, y, q1, m, r, n, c, Geometry(ndim, dims, sum, sup), floor, with_l1,    \
                      threads);                                                                 \
  }                                                                                             \
  extern "C" double dn_backward_##S(const T* g, const T* x, const T* q1, const T* m,           \
                                    const T* r, T* grad_x, int64_t n, int64_t c, int64_t ndim, \
                                    const int64_t* dims, const int64_t* sum, const int64_t* sup, \
                                    double coef, int with_l1, int threads) {                   \
    return backward<T>(g, x, q1, m, r, grad_x, n, c, Geometry(ndim, dims, sum, sup), coef,     \
                       with_l1, threads);                                                       \
  }

DN_EXPORT(float, f32)
DN_EXPORT(double, f64)
