// Fused divisive normalization over all channels and local positional windows, on the CPU.
// Built and loaded by cpu.py; the formulas are those of eager.py (this folder):
//
//   q1 = mean_c x, s2 = mean_c (x - q1)^2           (per sample and position)
//   m  = A(q1),  e = B(s2 + (q1 - m)^2),  r = 1 / sqrt(e + floor)
//   y  = (x - m) r
//
// The channel moments are taken about channel 0's value at each position (no cancellation
// when the mean is large against the spread); so is mean_c g (x - m) in the backward.
//
// x, y, g and the input gradient are contiguous (N, C, P); q1, m and r are (N, P) with
// P = prod(dims). A and B are box means along each positional axis: windows up to kDirectWidth
// by masked shifted adds over the plane, wider ones by running sums in double (the cost does
// not grow with the window). Each sample is one task: its statistics pass and
// its output pass run back to back, so the second pass reads the sample's C x P values from
// cache rather than memory. Tasks are spread with OpenMP (the libgomp torch has loaded).
//
// The same library holds the per-step work of the fused LSTM (lit_divnorm/models/fused_rnn.py):
// the gate and cell norms over feature rows, the gates and the cell, forward and backward.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTile = 8;  // rows whose running sums advance side by side (box_tile)
constexpr int64_t kDirectWidth = 7;  // windows up to this width are summed directly (box_direct)
constexpr int64_t kSpan = 1024;  // values a T accumulator sums before a double takes over
constexpr int64_t kShortRow = 2048;  // bytes: output rows up to this long go four a pass

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

  // Small windows (direct_sum, direct_sup): box means by shifted sums over the whole plane,
  // with each position's coordinate along each axis (coords) and divisor (the plane scales).
  bool direct_sum = true, direct_sup = true;
  std::vector<int32_t> coords;  // (ndim, P)
  std::vector<double> sum_plane, sup_plane;

  Geometry(int64_t ndim, const int64_t* lengths, const int64_t* sum_spec,
           const int64_t* sup_spec)
      : dims(lengths, lengths + ndim) {
    for (int64_t a = 0; a < ndim; ++a) {
      sum.push_back({sum_spec[3 * a], sum_spec[3 * a + 1], sum_spec[3 * a + 2]});
      sup.push_back({sup_spec[3 * a], sup_spec[3 * a + 1], sup_spec[3 * a + 2]});
      sum_scale.push_back(scales(dims[a], sum.back()));
      sup_scale.push_back(scales(dims[a], sup.back()));
      direct_sum = direct_sum && small(sum.back());
      direct_sup = direct_sup && small(sup.back());
    }
    if (!direct_sum && !direct_sup) return;
    const int64_t p = positions();
    coords.resize(ndim * p);
    sum_plane.assign(p, 1.0);
    sup_plane.assign(p, 1.0);
    int64_t inner = p;
    for (int64_t a = 0; a < ndim; ++a) {
      inner /= dims[a];
      for (int64_t block = 0, j = 0; block < p; block += inner, j = (j + 1) % dims[a]) {
        for (int64_t i = block; i < block + inner; ++i) {
          coords[a * p + i] = static_cast<int32_t>(j);
          sum_plane[i] *= sum_scale[a][j];
          sup_plane[i] *= sup_scale[a][j];
        }
      }
    }
  }

  // Whether a window is summed directly (a few shifted adds) rather than by running sums.
  static bool small(const Window& w) { return w.before + w.after + 1 <= kDirectWidth; }

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

  // The doubles box() needs: (len + 1) * inner for an axis, (len + 1) * kTile for the last.
  int64_t prefix_size() const {
    int64_t longest = 1;
    for (int64_t len : dims) longest = std::max(longest, len);
    return 2 * positions() + kTile * (longest + 1);  // (box_direct uses the first P)
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

// The box means (their transpose with adjoint) of rows first .. first + count - 1 (count <=
// kTile) of `in` (rows, len) into `out`. The running sums advance along the rows with the
// tile's rows side by side, so that they vectorize across rows; `prefix` holds
// (len + 1) * kTile doubles.
template <typename T>
void box_tile(const T* in, T* out, int64_t count, int64_t len, const Window& w,
              const double* scale, bool adjoint, double* prefix) {
  const int64_t lead = adjoint ? w.after : w.before;
  const int64_t lag = adjoint ? w.before : w.after;
  for (int64_t k = 0; k < kTile; ++k) prefix[k] = 0.0;
  for (int64_t j = 0; j < len; ++j) {
    const double factor = adjoint ? scale[j] : 1.0;
    const double* before = prefix + j * kTile;
    double* after = prefix + (j + 1) * kTile;
    for (int64_t k = 0; k < kTile; ++k)
      after[k] = before[k] + (k < count ? factor * static_cast<double>(in[k * len + j]) : 0.0);
  }
  for (int64_t j = 0; j < len; ++j) {
    const double factor = adjoint ? 1.0 : scale[j];
    const double* high = prefix + std::min(len, j + lag + 1) * kTile;
    const double* low = prefix + std::max<int64_t>(0, j - lead) * kTile;
    for (int64_t k = 0; k < count; ++k)
      out[k * len + j] = static_cast<T>((high[k] - low[k]) * factor);
  }
}

// out = the sums of `in` over the window (lead before, lag after) along the axis of `stride`
// and length `len` of a plane of p values (zero outside), by one masked shifted add per offset.
template <typename T>
void window_sums(const T* in, T* __restrict out, int64_t p, int64_t stride, int64_t len,
                 const int32_t* __restrict coord, int64_t lead, int64_t lag) {
  std::copy(in, in + p, out);
  for (int64_t d = -lead; d <= lag; ++d) {
    if (d == 0) continue;
    const int64_t shift = d * stride;
    const int64_t lo = std::max<int64_t>(0, -shift), hi = std::min(p, p - shift);
    const T* __restrict src = in + shift;
    const int32_t dd = static_cast<int32_t>(d), top = static_cast<int32_t>(len);
    for (int64_t i = lo; i < hi; ++i) {
      const int32_t k = coord[i] + dd;
      out[i] += (k >= 0 && k < top) ? src[i] : T(0);
    }
  }
}

// In place: v <- A v (or A^T v with adjoint) for windows of at most kDirectWidth: the window
// sums along each axis (sides swapped for the adjoint), scaled by the plane's divisors after
// (before, for the adjoint). `work` holds p values.
template <typename T>
void box_direct(T* v, const Geometry& geo, const std::vector<Window>& windows,
                const std::vector<double>& plane, bool adjoint, T* work) {
  const int64_t p = geo.positions();
  if (adjoint)
    for (int64_t i = 0; i < p; ++i) v[i] = static_cast<T>(v[i] * plane[i]);
  T* from = v;
  T* to = work;
  int64_t stride = p;
  for (size_t a = 0; a < geo.dims.size(); ++a) {
    const Window& w = windows[a];
    stride /= geo.dims[a];
    if (w.before == 0 && w.after == 0) continue;
    window_sums(from, to, p, stride, geo.dims[a], geo.coords.data() + a * p,
                adjoint ? w.after : w.before, adjoint ? w.before : w.after);
    std::swap(from, to);
  }
  if (from != v) std::copy(from, from + p, v);
  if (!adjoint)
    for (int64_t i = 0; i < p; ++i) v[i] = static_cast<T>(v[i] * plane[i]);
}

// In place: v <- A v (or A^T v with adjoint), A the box means of `windows` along every axis.
// The last axis goes row by row in tiles (box_tile), so that its running sums too vectorize.
// `prefix` holds geo.prefix_size() doubles.
template <typename T>
void box(T* v, const Geometry& geo, const std::vector<Window>& windows,
         const std::vector<std::vector<double>>& scales, bool adjoint, double* prefix) {
  const int64_t p = geo.positions();
  const bool of_sum = &windows == &geo.sum;
  if (of_sum ? geo.direct_sum : geo.direct_sup) {
    box_direct(v, geo, windows, of_sum ? geo.sum_plane : geo.sup_plane, adjoint,
               reinterpret_cast<T*>(prefix));
    return;
  }
  int64_t outer = 1;
  for (size_t a = 0; a < geo.dims.size(); ++a) {
    const int64_t len = geo.dims[a];
    const int64_t inner = p / outer / len;
    const double* scale = scales[a].data();
    if (inner > 1 || outer == 1) {
      box_axis(v, outer, len, inner, windows[a], scale, adjoint, prefix);
    } else {
      for (int64_t first = 0; first < outer; first += kTile)
        box_tile(v + first * len, v + first * len, std::min(kTile, outer - first), len,
                 windows[a], scale, adjoint, prefix);
    }
    outer *= len;
  }
}

// Brings values from..to of x (clamped to its `size` values) into L1 ahead of a moment pass.
// A pass that sums short rows (kShortRow bytes or fewer) reads a few lines from each of several
// rows: streams too short for the hardware prefetcher, so over data that the rest of a network
// has evicted it waits on memory line by line (measured: a four-row pass over cold 16x16 maps
// 1.6x, over 8x8 2.7x, the time of one contiguous sum over the same values; prefetching one
// block ahead recovers half of it). Longer rows are left to the hardware.
template <typename T>
inline void prefetch_block(const T* x, int64_t from, int64_t to, int64_t size) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = from; i < std::min(to, size); i += kLine) __builtin_prefetch(x + i, 0, 3);
}

// The channel moments about channel 0's value at each position of the (c, p) rows x:
// a[j] = sum_c (x[c, j] - x[0, j]) and b[j] = sum_c (x[c, j] - x[0, j])^2, streaming four rows
// at a time (the accumulator rows stay in cache and are stored once per four rows). Moments
// about a shift near the data do not cancel when the mean is large against the spread. `size`:
// the values from x to the end of its tensor (how far prefetch_block may look ahead).
template <typename T>
void shifted_moments(const T* x, int64_t c, int64_t p, T* __restrict a, T* __restrict b,
                     int64_t size) {
  std::fill(a, a + p, T(0));
  std::fill(b, b + p, T(0));
  const T* __restrict x0 = x;
  const bool prefetch = p * static_cast<int64_t>(sizeof(T)) <= kShortRow;
  int64_t ch = 1;  // channel 0 adds nothing about itself
  for (; ch + 4 <= c; ch += 4) {
    if (prefetch) prefetch_block(x, (ch + 4) * p, (ch + 8) * p, size);  // the next four rows
    const T* __restrict u0 = x + ch * p;
    const T* __restrict u1 = u0 + p;
    const T* __restrict u2 = u1 + p;
    const T* __restrict u3 = u2 + p;
    for (int64_t j = 0; j < p; ++j) {
      const T s = x0[j];
      const T d0 = u0[j] - s, d1 = u1[j] - s, d2 = u2[j] - s, d3 = u3[j] - s;
      a[j] += (d0 + d1) + (d2 + d3);
      b[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; ch < c; ++ch) {
    const T* __restrict row = x + ch * p;
    for (int64_t j = 0; j < p; ++j) {
      const T d = row[j] - x0[j];
      a[j] += d;
      b[j] += d * d;
    }
  }
}

// The gradient's moments: a[j] = sum_c g[c, j] and b[j] = sum_c g[c, j] (x[c, j] - x[0, j]),
// about the same shift as shifted_moments, eight rows at a time; WithSign also counts
// sign[j] = sum_c sign(x[c, j] - m[j]) in the same pass (the L1 term's). (Prefetching its next
// eight rows of g and x, as shifted_moments does, measured 4% slower over cold 16x16 maps.)
template <typename T>
inline T sign_of(T v) {
  return static_cast<T>((v > 0) - (v < 0));
}

template <typename T, bool WithSign>
void gradient_moments(const T* g, const T* x, const T* __restrict m, int64_t c, int64_t p,
                      T* __restrict a, T* __restrict b, T* __restrict sign) {
  std::fill(a, a + p, T(0));
  std::fill(b, b + p, T(0));
  if (WithSign) std::fill(sign, sign + p, T(0));
  const T* __restrict x0 = x;
  int64_t ch = 0;
  for (; ch + 8 <= c; ch += 8) {  // eight rows a pass: the accumulators load once per eight
    const T* __restrict gr = g + ch * p;
    const T* __restrict ur = x + ch * p;
    for (int64_t j = 0; j < p; ++j) {
      const T s = x0[j];
      T ga = T(0), gb = T(0), sg = T(0);
      for (int64_t i = 0; i < 8; ++i) {
        const T gi = gr[i * p + j], ui = ur[i * p + j];
        ga += gi;
        gb += gi * (ui - s);
        if (WithSign) sg += sign_of(ui - m[j]);
      }
      a[j] += ga;
      b[j] += gb;
      if (WithSign) sign[j] += sg;
    }
  }
  for (; ch < c; ++ch) {
    const T* __restrict grow = g + ch * p;
    const T* __restrict row = x + ch * p;
    for (int64_t j = 0; j < p; ++j) {
      a[j] += grow[j];
      b[j] += grow[j] * (row[j] - x0[j]);
      if (WithSign) sign[j] += sign_of(row[j] - m[j]);
    }
  }
}

// One sample's output rows y[c, j] = (x[c, j] - m[j]) r[j]; returns sum |x - m| WithL1, else 0.
// Rows of up to kShortRow bytes go four a pass, so that the per-position terms load once per
// four rows (measured 5-15% faster at 16x16 and 8x8 maps). Longer rows go one at a time: at
// 32x32 (4 KiB rows, four of them sharing L1 sets) four a pass was 5-10% slower.
template <typename T, bool WithL1>
double normalized_rows(const T* __restrict x, const T* __restrict m, const T* __restrict r,
                       T* __restrict y, int64_t c, int64_t p) {
  double l1 = 0.0;
  int64_t ch = 0;
  for (; p * static_cast<int64_t>(sizeof(T)) <= kShortRow && ch + 4 <= c; ch += 4) {
    const int64_t row = ch * p;
    T partial = T(0);
#pragma omp simd reduction(+ : partial)
    for (int64_t j = 0; j < p; ++j) {
      const T mj = m[j], rj = r[j];
      for (int64_t i = 0; i < 4; ++i) {
        const T v = x[row + i * p + j] - mj;
        y[row + i * p + j] = v * rj;
        if (WithL1) partial += std::fabs(v);
      }
    }
    l1 += static_cast<double>(partial);
  }
  for (; ch < c; ++ch) {
    const int64_t row = ch * p;
    T partial = T(0);
#pragma omp simd reduction(+ : partial)
    for (int64_t j = 0; j < p; ++j) {
      const T v = x[row + j] - m[j];
      y[row + j] = v * r[j];
      if (WithL1) partial += std::fabs(v);
    }
    l1 += static_cast<double>(partial);
  }
  return l1;
}

// The input gradient of one sample's (c, p) rows from the per-position terms r, k, b:
// out[c, j] = g[c, j] r[j] + k[j] (x[c, j] - m[j]) + b[j], plus coef sign(x[c, j] - m[j])
// WithL1; rows of up to kShortRow bytes four a pass, as in normalized_rows.
template <typename T, bool WithL1>
void gradient_rows(const T* __restrict g, const T* __restrict x, const T* __restrict m,
                   const T* __restrict r, const T* __restrict k, const T* __restrict b,
                   T* __restrict out, int64_t c, int64_t p, T coef) {
  int64_t ch = 0;
  for (; p * static_cast<int64_t>(sizeof(T)) <= kShortRow && ch + 4 <= c; ch += 4) {
    const int64_t row = ch * p;
    for (int64_t j = 0; j < p; ++j) {
      const T mj = m[j], rj = r[j], kj = k[j], bj = b[j];
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t at = row + i * p + j;
        const T v = x[at] - mj;  // (x - m first: no cancellation at a large mean)
        T value = g[at] * rj + kj * v + bj;
        if (WithL1) value += coef * sign_of(v);
        out[at] = value;
      }
    }
  }
  for (; ch < c; ++ch) {
    const int64_t row = ch * p;
    for (int64_t j = 0; j < p; ++j) {
      const T v = x[row + j] - m[j];
      T value = g[row + j] * r[j] + k[j] * v + b[j];
      if (WithL1) value += coef * sign_of(v);
      out[row + j] = value;
    }
  }
}

// The calling thread's scratch buffer number `slot` with room for `count` values, kept from
// call to call (OpenMP reuses its threads) so that no step allocates.
template <typename T>
T* scratch(int slot, int64_t count) {
  thread_local std::vector<T> buffers[4];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
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
    double* prefix = scratch<double>(2, geo.prefix_size());
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const T* xs = x + s * c * p;
      T* ys = y + s * c * p;
      T* __restrict a = q1 + s * p;
      T* __restrict b = square;
      T* __restrict ms = m + s * p;
      T* __restrict rs = r + s * p;
      shifted_moments(xs, c, p, a, b, (n - s) * c * p);
      for (int64_t j = 0; j < p; ++j) {
        const T mean = a[j] * inv;
        b[j] = std::max(b[j] * inv - mean * mean, T(0));  // the variance over channels
        a[j] = xs[j] + mean;
        ms[j] = a[j];
      }
      box(ms, geo, geo.sum, geo.sum_scale, false, prefix);
      for (int64_t j = 0; j < p; ++j) {
        const T centre = a[j] - ms[j];
        b[j] += centre * centre;
      }
      box(b, geo, geo.sup, geo.sup_scale, false, prefix);
      for (int64_t j = 0; j < p; ++j) rs[j] = T(1) / std::sqrt(b[j] + tfloor);
      l1 += with_l1 ? normalized_rows<T, true>(xs, ms, rs, ys, c, p)
                    : normalized_rows<T, false>(xs, ms, rs, ys, c, p);
    }
  }
  return l1;
}

// The input gradient of y and, when WithL1, of coef * sum |x - m|; returns dL/dfloor.
template <typename T, bool WithL1>
double backward_pass(const T* g, const T* x, const T* q1, const T* m, const T* r, T* grad_x,
                     int64_t n, int64_t c, const Geometry& geo, double coef, int threads) {
  const int64_t p = geo.positions();
  const T inv = T(1) / T(c);
  const T tc = static_cast<T>(c);
  const T tcoef = static_cast<T>(coef);
  double grad_floor = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : grad_floor)
  {
    T* sums = scratch<T>(0, 3 * p);
    double* prefix = scratch<double>(2, geo.prefix_size());
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const T* gs = g + s * c * p;
      const T* xs = x + s * c * p;
      T* gxs = grad_x + s * c * p;
      const T* __restrict q = q1 + s * p;
      const T* __restrict ms = m + s * p;
      const T* __restrict rs = r + s * p;
      T* __restrict mg = sums;        // mean_c g, then dL/dm, then b
      T* __restrict mgx = mg + p;     // mean_c g x, then dL/de, then k
      T* __restrict msign = mgx + p;  // sum_c sign(x - m)
      gradient_moments<T, WithL1>(gs, xs, ms, c, p, mg, mgx, msign);
      double floor_partial = 0.0;
#pragma omp simd reduction(+ : floor_partial)
      for (int64_t j = 0; j < p; ++j) {
        mg[j] *= inv;
        const T r3 = rs[j] * rs[j] * rs[j];
        mgx[j] = (mgx[j] * inv + (xs[j] - ms[j]) * mg[j]) * (T(-0.5) * tc * r3);
        floor_partial += static_cast<double>(mgx[j]);
      }
      grad_floor += floor_partial;
      box(mgx, geo, geo.sup, geo.sup_scale, true, prefix);
      for (int64_t j = 0; j < p; ++j) {
        mgx[j] *= T(2) * inv;
        mg[j] = -tc * (rs[j] * mg[j] + mgx[j] * (q[j] - ms[j]));
        if (WithL1) mg[j] -= tcoef * msign[j];  // = c coef mean_c sign(x - m)
      }
      box(mg, geo, geo.sum, geo.sum_scale, true, prefix);
      for (int64_t j = 0; j < p; ++j) mg[j] *= inv;
      gradient_rows<T, WithL1>(gs, xs, ms, rs, mgx, mg, gxs, c, p, tcoef);
    }
  }
  return grad_floor;
}

template <typename T>
double backward(const T* g, const T* x, const T* q1, const T* m, const T* r, T* grad_x,
                int64_t n, int64_t c, const Geometry& geo, double coef, int with_l1,
                int threads) {
  if (with_l1) return backward_pass<T, true>(g, x, q1, m, r, grad_x, n, c, geo, coef, threads);
  return backward_pass<T, false>(g, x, q1, m, r, grad_x, n, c, geo, coef, threads);
}

// Local mean subtraction only (dnms): y = x - A(mean_c x); with adjoint the backward,
// dL/dx = g - A^T(mean_c g). One task per sample, two passes over its (C, P) values.
template <typename T>
void centre(const T* x, T* y, int64_t n, int64_t c, const Geometry& geo, bool adjoint,
            int threads) {
  const int64_t p = geo.positions();
  const T inv = T(1) / T(c);
#pragma omp parallel num_threads(threads)
  {
    T* mean = scratch<T>(0, p);
    double* prefix = scratch<double>(2, geo.prefix_size());
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const T* xs = x + s * c * p;
      T* ys = y + s * c * p;
      std::copy(xs, xs + p, mean);
      for (int64_t ch = 1; ch < c; ++ch) {
        const T* __restrict row = xs + ch * p;
        for (int64_t j = 0; j < p; ++j) mean[j] += row[j];
      }
      for (int64_t j = 0; j < p; ++j) mean[j] *= inv;
      box(mean, geo, geo.sum, geo.sum_scale, adjoint, prefix);
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* __restrict row = xs + ch * p;
        T* __restrict out = ys + ch * p;
        for (int64_t j = 0; j < p; ++j) out[j] = row[j] - mean[j];
      }
    }
  }
}

// out = the box means (their transpose with adjoint) of each row of `in` (rows, len), one
// window for all rows; out may be in.
template <typename T>
void box_rows(const T* in, T* out, int64_t rows, int64_t len, const Window& w,
              const double* scale, bool adjoint, int threads) {
  const int64_t tiles = (rows + kTile - 1) / kTile;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * len >= 32768)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t first = tile * kTile;
    box_tile(in + first * len, out + first * len, std::min(kTile, rows - first), len, w, scale,
             adjoint, scratch<double>(2, (len + 1) * kTile));
  }
}

// ---- The channel-window field (local response normalization) ----
//
//   d = floor + alpha B_c(x^2),  y = x d^(-power)
//   dL/dx = g d^(-power) + 2 alpha x B_c^T(-power g x d^(-power-1))
//
// B_c is the box mean over a window of neighbouring channels at each position. Per sample, a
// row of P doubles slides along the channels (add the channel entering the window, drop the one
// leaving), so the cost does not grow with the window; the adjoint slides the other way over
// values scaled by 1 / (window size).

// Calls emit(j, acc) for each channel j with acc the sum over channels j - lead .. j + lag
// (clipped) of the rows add(i, acc, sign) adds into acc (sign +1 or -1).
template <typename Add, typename Emit>
void slide_channels(int64_t c, int64_t p, int64_t lead, int64_t lag, double* acc, Add add,
                    Emit emit) {
  std::fill(acc, acc + p, 0.0);
  for (int64_t i = 0; i <= std::min(lag, c - 1); ++i) add(i, acc, 1.0);
  for (int64_t j = 0; j < c; ++j) {
    emit(j, acc);
    if (j + 1 + lag < c) add(j + 1 + lag, acc, 1.0);
    if (j - lead >= 0) add(j - lead, acc, -1.0);
  }
}

template <typename T>
inline T negative_power(T d, T power) {
  return power == T(0.5) ? T(1) / std::sqrt(d) : std::pow(d, -power);
}

template <typename T>
void channel_forward(const T* x, T* y, int64_t n, int64_t c, int64_t p, const Window& w,
                     double floor, double alpha, double power, int threads) {
  const std::vector<double> scale = Geometry::scales(c, w);
  const T tpow = static_cast<T>(power);
#pragma omp parallel num_threads(threads)
  {
    double* acc = scratch<double>(2, p);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const T* xs = x + s * c * p;
      T* ys = y + s * c * p;
      auto add = [&](int64_t i, double* a, double sign) {
        const T* __restrict row = xs + i * p;
        for (int64_t k = 0; k < p; ++k) a[k] += sign * static_cast<double>(row[k] * row[k]);
      };
      auto emit = [&](int64_t j, const double* a) {
        const double factor = alpha * scale[j];
        const T* __restrict row = xs + j * p;
        T* __restrict out = ys + j * p;
        for (int64_t k = 0; k < p; ++k)
          out[k] = row[k] * negative_power(static_cast<T>(floor + factor * a[k]), tpow);
      };
      slide_channels(c, p, w.before, w.after, acc, add, emit);
    }
  }
}

// Returns dL/dfloor.
template <typename T>
double channel_backward(const T* g, const T* x, T* grad_x, int64_t n, int64_t c, int64_t p,
                        const Window& w, double floor, double alpha, double power, int threads) {
  const std::vector<double> scale = Geometry::scales(c, w);
  const T tpow = static_cast<T>(power);
  double grad_floor = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : grad_floor)
  {
    double* acc = scratch<double>(2, p);
    T* factor = scratch<T>(0, c * p);  // d^(-power)
    T* inner = scratch<T>(1, c * p);   // -power g x d^(-power-1) / (window size)
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      const T* gs = g + s * c * p;
      const T* xs = x + s * c * p;
      T* gxs = grad_x + s * c * p;
      auto add_square = [&](int64_t i, double* a, double sign) {
        const T* __restrict row = xs + i * p;
        for (int64_t k = 0; k < p; ++k) a[k] += sign * static_cast<double>(row[k] * row[k]);
      };
      auto emit_factor = [&](int64_t j, const double* a) {
        const T* __restrict xrow = xs + j * p;
        const T* __restrict grow = gs + j * p;
        T* __restrict f = factor + j * p;
        T* __restrict t = inner + j * p;
        double partial = 0.0;
        for (int64_t k = 0; k < p; ++k) {
          const T d = static_cast<T>(floor + alpha * scale[j] * a[k]);
          f[k] = negative_power(d, tpow);
          const T term = -tpow * grow[k] * xrow[k] * f[k] / d;
          partial += static_cast<double>(term);
          t[k] = static_cast<T>(term * scale[j]);
        }
        grad_floor += partial;
      };
      slide_channels(c, p, w.before, w.after, acc, add_square, emit_factor);
      auto add_inner = [&](int64_t i, double* a, double sign) {
        const T* __restrict row = inner + i * p;
        for (int64_t k = 0; k < p; ++k) a[k] += sign * static_cast<double>(row[k]);
      };
      auto emit_grad = [&](int64_t j, const double* a) {
        const T* __restrict xrow = xs + j * p;
        const T* __restrict grow = gs + j * p;
        const T* __restrict f = factor + j * p;
        T* __restrict out = gxs + j * p;
        for (int64_t k = 0; k < p; ++k)
          out[k] = grow[k] * f[k] + static_cast<T>(2.0 * alpha * a[k]) * xrow[k];
      };
      slide_channels(c, p, w.after, w.before, acc, add_inner, emit_grad);
    }
  }
  return grad_floor;
}

// ---- Fields over whole groups of units: batch (a channel over every sample and position) or
// per-sample groups (G groups of C / G channels over every position: layer G = 1, instance
// G = C), with the L1 term fused in ----
//
//   mu = mean_F x (centre; else 0),  var = mean_F (x - mu)^2,  r = 1 / sqrt(var + floor) (scale;
//   else 1),  xh = (x - mu) r,  y = w_c xh + b_c,  l1 = sum |x - mu|
//   dL/dx = r (gh - A / M - xh B / M) + coef (s - S / M),  gh = w_c g, A = sum_F gh,
//   B = sum_F gh xh, s = sign(x - mu), S = sum_F s  (the A and S terms only with centre)
//
// Each group's M members are visited as rows of P values: per-sample groups are one block of
// (C / G) rows, a batch group is one row per sample. Moments are taken about the group's first
// value, in double.

// Calls row(pointer offset, channel) for each row of group `gi` (see above).
template <typename Row>
inline void for_rows(int64_t gi, int64_t n, int64_t c, int64_t p, int64_t groups, Row row) {
  if (groups == 0) {  // batch: group gi is channel gi of every sample
    for (int64_t s = 0; s < n; ++s) row((s * c + gi) * p, gi);
  } else {
    const int64_t per = c / groups, sample = gi / groups, first = (gi % groups) * per;
    for (int64_t ch = first; ch < first + per; ++ch) row((sample * c + ch) * p, ch);
  }
}

template <typename T>
double field_forward(const T* x, T* y, T* stats, const T* w, const T* b, int64_t n, int64_t c,
                     int64_t p, int64_t groups, int centre, int scale, double floor,
                     int with_l1, int threads) {
  const int64_t total = groups == 0 ? c : n * groups;
  const int64_t members = groups == 0 ? n * p : (c / groups) * p;
  T* mean = stats;
  T* var = stats + total;
  T* rstd = stats + 2 * total;
  double l1 = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : l1)
  for (int64_t gi = 0; gi < total; ++gi) {
    const T shift = centre ? x[groups == 0 ? gi * p : gi * members] : T(0);
    double sum = 0.0, square = 0.0;
    // blocks of at most kSpan values in T, summed in double: a per-sample group is one
    // contiguous block of `members` values, a batch group one row per sample
    auto moments = [&](const T* __restrict span, int64_t count) {
      for (int64_t first = 0; first < count; first += kSpan) {
        const int64_t last = std::min(count, first + kSpan);
        T rs = T(0), rq = T(0);
#pragma omp simd reduction(+ : rs, rq)
        for (int64_t j = first; j < last; ++j) {
          const T d = span[j] - shift;
          rs += d;
          rq += d * d;
        }
        sum += static_cast<double>(rs);
        square += static_cast<double>(rq);
      }
    };
    if (groups == 0)
      for_rows(gi, n, c, p, groups, [&](int64_t at, int64_t) { moments(x + at, p); });
    else
      moments(x + gi * members, members);
    const double inside = sum / members;
    const double mu = centre ? static_cast<double>(shift) + inside : 0.0;
    const double spread = centre ? std::max(square / members - inside * inside, 0.0)
                                 : square / members;
    const double r = scale ? 1.0 / std::sqrt(spread + floor) : 1.0;
    mean[gi] = static_cast<T>(mu);
    var[gi] = static_cast<T>(spread);
    rstd[gi] = static_cast<T>(r);
    const T tm = static_cast<T>(mu), tr = static_cast<T>(r);
    double partial = 0.0;
    for_rows(gi, n, c, p, groups, [&](int64_t at, int64_t ch) {
      const T* __restrict row = x + at;
      T* __restrict out = y + at;
      const T scale_c = (w ? w[ch] : T(1)) * tr, offset = b ? b[ch] : T(0);
      if (!with_l1) {
        for (int64_t j = 0; j < p; ++j) out[j] = (row[j] - tm) * scale_c + offset;
        return;
      }
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < p; ++j) {
        const T v = row[j] - tm;
        out[j] = v * scale_c + offset;
        acc += std::fabs(v);
      }
      partial += static_cast<double>(acc);
    });
    if (with_l1) l1 += partial;
  }
  return l1;
}

// Writes dL/dx and, where given, dL/dw and dL/db ((C,) each); returns dL/dfloor.
template <typename T>
double field_backward(const T* g, const T* x, const T* stats, const T* w, T* grad_x, T* grad_w,
                      T* grad_b, int64_t n, int64_t c, int64_t p, int64_t groups, int centre,
                      int scale, double coef, int with_l1, int threads) {
  const int64_t total = groups == 0 ? c : n * groups;
  const int64_t members = groups == 0 ? n * p : (c / groups) * p;
  const T* mean = stats;
  const T* rstd = stats + 2 * total;
  const bool affine_grads = grad_w != nullptr || grad_b != nullptr;
  std::vector<double> channel_w(affine_grads ? c : 0, 0.0), channel_b(affine_grads ? c : 0, 0.0);
  double grad_floor = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : grad_floor)
  {
    std::vector<double> my_w(affine_grads ? c : 0, 0.0), my_b(affine_grads ? c : 0, 0.0);
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < total; ++gi) {
      const T tm = mean[gi], tr = rstd[gi];
      double sum_gh = 0.0, sum_ghxh = 0.0, sum_sign = 0.0;
      for_rows(gi, n, c, p, groups, [&](int64_t at, int64_t ch) {
        const T* __restrict grow = g + at;
        const T* __restrict xrow = x + at;
        const T wc = w ? w[ch] : T(1);
        T sg = T(0), sgx = T(0), ss = T(0);
        if (with_l1) {
#pragma omp simd reduction(+ : sg, sgx, ss)
          for (int64_t j = 0; j < p; ++j) {
            const T v = xrow[j] - tm;
            sg += grow[j];
            sgx += grow[j] * v;
            ss += sign_of(v);
          }
        } else {
#pragma omp simd reduction(+ : sg, sgx)
          for (int64_t j = 0; j < p; ++j) {
            sg += grow[j];
            sgx += grow[j] * (xrow[j] - tm);
          }
        }
        sum_gh += static_cast<double>(wc) * sg;
        sum_ghxh += static_cast<double>(wc) * sgx * tr;
        sum_sign += ss;
        if (affine_grads) {
          my_b[ch] += sg;
          my_w[ch] += static_cast<double>(sgx) * tr;
        }
      });
      if (scale) grad_floor += -0.5 * static_cast<double>(tr) * tr * sum_ghxh;
      const T a = centre ? static_cast<T>(sum_gh / members) : T(0);
      const T bm = scale ? static_cast<T>(sum_ghxh / members) : T(0);
      const T sm = centre && with_l1 ? static_cast<T>(sum_sign / members) : T(0);
      const T tcoef = with_l1 ? static_cast<T>(coef) : T(0);
      for_rows(gi, n, c, p, groups, [&](int64_t at, int64_t ch) {
        const T* __restrict grow = g + at;
        const T* __restrict xrow = x + at;
        T* __restrict out = grad_x + at;
        const T wc = w ? w[ch] : T(1);
        const T gw = tr * wc, trb = tr * tr * bm, ta = tr * a;
        if (!with_l1) {
          for (int64_t j = 0; j < p; ++j) out[j] = gw * grow[j] - ta - (xrow[j] - tm) * trb;
          return;
        }
        for (int64_t j = 0; j < p; ++j) {
          const T v = xrow[j] - tm;
          out[j] = gw * grow[j] - ta - v * trb + tcoef * (sign_of(v) - sm);
        }
      });
    }
    if (affine_grads) {
#pragma omp critical
      for (int64_t ch = 0; ch < c; ++ch) {
        channel_w[ch] += my_w[ch];
        channel_b[ch] += my_b[ch];
      }
    }
  }
  for (int64_t ch = 0; affine_grads && ch < c; ++ch) {
    if (grad_w) grad_w[ch] = static_cast<T>(channel_w[ch]);
    if (grad_b) grad_b[ch] = static_cast<T>(channel_b[ch]);
  }
  return grad_floor;
}

// ---- LSTM time steps with feature-vector norms (lit_divnorm/models/fused_rnn.py) ----

// exp for float in plain arithmetic, so that loops over it vectorize (Cephes' expf: range
// reduction by ln 2, a degree-6 polynomial, the power of 2 written into the exponent bits).
inline float exp_fast(float x) {
  x = std::max(-87.0f, std::min(x, 88.0f));
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, sizeof power);
  return (p * r * r + r + 1.0f) * power;
}

inline void sigmoid_row(float* a, int64_t len) {
  for (int64_t j = 0; j < len; ++j) a[j] = 1.0f / (1.0f + exp_fast(-a[j]));
}
inline void sigmoid_row(double* a, int64_t len) {
  for (int64_t j = 0; j < len; ++j) a[j] = 1.0 / (1.0 + std::exp(-a[j]));
}
inline void tanh_row(float* a, int64_t len) {
  for (int64_t j = 0; j < len; ++j) a[j] = 2.0f / (1.0f + exp_fast(-2.0f * a[j])) - 1.0f;
}
inline void tanh_row(double* a, int64_t len) {
  for (int64_t j = 0; j < len; ++j) a[j] = std::tanh(a[j]);
}

// A norm field over the len features of each row: spec = (mode, before, after, divisor),
// mode 0 none, 1 the mean over all features (a layer field), 2 a window (divisor 0: count the
// features inside). The functions below work on `rows` rows at once, in one thread.
struct RowField {
  int64_t mode;
  Window w;
  std::vector<double> scale;

  RowField(const int64_t* spec, int64_t len) : mode(spec[0]), w{spec[1], spec[2], spec[3]} {
    if (mode == 2) scale = Geometry::scales(len, w);
  }

  // out = the field mean of each row of u (its transpose with adjoint); out may be u.
  template <typename T>
  void mean(const T* u, T* out, int64_t rows, int64_t len, bool adjoint) const {
    if (mode == 2) {
      box_rows(u, out, rows, len, w, scale.data(), adjoint, 1);
      return;
    }
    for (int64_t i = 0; i < rows; ++i) {
      double total = 0.0;
      for (int64_t j = 0; j < len; ++j) total += u[i * len + j];
      const T average = static_cast<T>(total / static_cast<double>(len));
      for (int64_t j = 0; j < len; ++j) out[i * len + j] = average;
    }
  }

  // r = (mean(v^2) + floor)^(-1/2) and y = v r (r: 1 value per row for mode 1, else len).
  template <typename T>
  void normalize(const T* v, T* r, T* y, int64_t rows, int64_t len, T floor, T* work) const {
    const int64_t n = rows * len;
    for (int64_t j = 0; j < n; ++j) work[j] = v[j] * v[j];
    mean(work, work, rows, len, false);
    if (mode == 1) {
      for (int64_t i = 0; i < rows; ++i) r[i] = T(1) / std::sqrt(work[i * len] + floor);
      for (int64_t j = 0; j < n; ++j) y[j] = v[j] * r[j / len];
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      r[j] = T(1) / std::sqrt(work[j] + floor);
      y[j] = v[j] * r[j];
    }
  }

  // In place: dL/dy -> dL/dv of normalize (v, r saved), plus l1 sign(v) when l1 != 0.
  template <typename T>
  void normalize_backward(T* grad, const T* v, const T* r, int64_t rows, int64_t len, T l1,
                          T* work) const {
    const int64_t n = rows * len;
    if (mode) {
      for (int64_t j = 0; j < n; ++j) {
        const T rj = r[mode == 1 ? j / len : j];
        work[j] = grad[j] * v[j] * (T(-0.5) * rj * rj * rj);
      }
      mean(work, work, rows, len, true);
      for (int64_t j = 0; j < n; ++j) grad[j] = grad[j] * r[mode == 1 ? j / len : j] + 2 * v[j] * work[j];
    }
    if (l1 != T(0))
      for (int64_t j = 0; j < n; ++j) grad[j] += l1 * sign_of(v[j]);
  }
};

// One forward step of FusedLSTM for the N samples: v (N, 4H) the gates' (centred)
// pre-activations i, f, g, o -> acts (N, 4H), c (N, H), tanh_n (N, H), h (N, H), and the
// norms' saved r (gate_r, cell_r) and centred cell (cell_v, when not null). Returns
// sum |v| and sum |cell_v| in l1_sums.
template <typename T>
void lstm_forward_step(const T* v, const T* c_prev, T* gate_r, T* acts, T* c, T* cell_v,
                       T* cell_r, T* tanh_n, T* h, int64_t n, int64_t hs,
                       const RowField& gate_sup, const RowField& cell_sum,
                       const RowField& cell_sup, T gate_floor, T cell_floor, double* l1_sums) {
  const int64_t rows = 4 * n;
  T* work = scratch<T>(0, rows * hs);
  T* centred = cell_v ? cell_v : scratch<T>(1, n * hs);
  if (gate_sup.mode)
    gate_sup.normalize(v, gate_r, acts, rows, hs, gate_floor, work);
  else
    std::copy(v, v + rows * hs, acts);
  for (int64_t row = 0; row < rows; ++row) {
    if (row % 4 == 2)
      tanh_row(acts + row * hs, hs);
    else
      sigmoid_row(acts + row * hs, hs);
  }
  for (int64_t s = 0; s < n; ++s) {
    const T* i = acts + s * 4 * hs;
    const T* f = i + hs;
    const T* g = i + 2 * hs;
    for (int64_t j = 0; j < hs; ++j) c[s * hs + j] = f[j] * c_prev[s * hs + j] + i[j] * g[j];
  }
  if (cell_sum.mode) {
    cell_sum.mean(c, centred, n, hs, false);
    for (int64_t j = 0; j < n * hs; ++j) centred[j] = c[j] - centred[j];
  } else {
    std::copy(c, c + n * hs, centred);
  }
  if (cell_sup.mode)
    cell_sup.normalize(centred, cell_r, tanh_n, n, hs, cell_floor, work);
  else
    std::copy(centred, centred + n * hs, tanh_n);
  tanh_row(tanh_n, n * hs);
  for (int64_t s = 0; s < n; ++s) {
    const T* o = acts + s * 4 * hs + 3 * hs;
    for (int64_t j = 0; j < hs; ++j) h[s * hs + j] = o[j] * tanh_n[s * hs + j];
  }
  T gate_abs = T(0), cell_abs = T(0);
  for (int64_t j = 0; j < rows * hs; ++j) gate_abs += std::fabs(v[j]);
  for (int64_t j = 0; j < n * hs; ++j) cell_abs += std::fabs(centred[j]);
  l1_sums[0] += gate_abs;
  l1_sums[1] += cell_abs;
}

// One backward step: from dL/dh_t (grad_h, plus grad_out when not null) and dL/dc_t (grad_c,
// updated in place to dL/dc_{t-1}) to dL/dv_t (grad_v, (N, 4H)); the saved tensors are those
// of the forward step (c_prev = c_{t-1}; gate_v, cell_v may be null when not needed).
template <typename T>
void lstm_backward_step(const T* grad_h, const T* grad_out, T* grad_c, const T* acts,
                        const T* c_prev, const T* tanh_n, const T* gate_v, const T* gate_r,
                        const T* cell_v, const T* cell_r, T* grad_v, int64_t n, int64_t hs,
                        const RowField& gate_sup, const RowField& cell_sum,
                        const RowField& cell_sup, T gate_l1, T cell_l1) {
  T* work = scratch<T>(0, 4 * n * hs);
  T* grad_n = scratch<T>(1, 2 * n * hs);
  T* grad_o = grad_n + n * hs;
  for (int64_t s = 0; s < n; ++s) {
    const T* o = acts + s * 4 * hs + 3 * hs;
    for (int64_t j = 0; j < hs; ++j) {
      const int64_t k = s * hs + j;
      const T dh = grad_out ? grad_h[k] + grad_out[k] : grad_h[k];
      grad_o[k] = dh * tanh_n[k];
      grad_n[k] = dh * o[j] * (T(1) - tanh_n[k] * tanh_n[k]);
    }
  }
  if (cell_sup.mode || cell_l1 != T(0))
    cell_sup.normalize_backward(grad_n, cell_v, cell_r, n, hs, cell_l1, work);
  if (cell_sum.mode) {
    cell_sum.mean(grad_n, work, n, hs, true);
    for (int64_t k = 0; k < n * hs; ++k) grad_c[k] += grad_n[k] - work[k];
  } else {
    for (int64_t k = 0; k < n * hs; ++k) grad_c[k] += grad_n[k];
  }
  for (int64_t s = 0; s < n; ++s) {
    const T* i = acts + s * 4 * hs;
    const T* f = i + hs;
    const T* g = i + 2 * hs;
    const T* o = i + 3 * hs;
    T* gc = grad_c + s * hs;
    const T* cp = c_prev + s * hs;
    const T* go = grad_o + s * hs;
    T* gv = grad_v + s * 4 * hs;
    for (int64_t j = 0; j < hs; ++j) {
      gv[j] = gc[j] * g[j] * i[j] * (T(1) - i[j]);
      gv[hs + j] = gc[j] * cp[j] * f[j] * (T(1) - f[j]);
      gv[2 * hs + j] = gc[j] * i[j] * (T(1) - g[j] * g[j]);
      gv[3 * hs + j] = go[j] * o[j] * (T(1) - o[j]);
      gc[j] *= f[j];
    }
  }
  if (gate_sup.mode || gate_l1 != T(0))
    gate_sup.normalize_backward(grad_v, gate_v, gate_r, 4 * n, hs, gate_l1, work);
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
  }                                                                                             \
  extern "C" void dn_centre_##S(const T* x, T* y, int64_t n, int64_t c, int64_t ndim,          \
                                const int64_t* dims, const int64_t* sum, int adjoint,          \
                                int threads) {                                                 \
    centre<T>(x, y, n, c, Geometry(ndim, dims, sum, sum), adjoint != 0, threads);              \
  }                                                                                             \
  /* step t over whole (T, ...) buffers; v advances by v_stride (0: one scratch row block) */  \
  extern "C" void dn_lstm_forward_step_##S(                                                      \
      const T* v, int64_t v_stride, T* gate_r, T* acts, T* cells, T* cell_v, T* cell_r,         \
      T* tanh_n, T* hs_all, int64_t n, int64_t hs, const int64_t* gate_sup,                     \
      const int64_t* cell_sum, const int64_t* cell_sup, double gate_floor, double cell_floor,   \
      double* l1_sums, int64_t t) {                                                             \
    const int64_t nh = n * hs;                                                                  \
    const int64_t gate_r_step = 4 * n * (gate_sup[0] == 1 ? 1 : hs);                            \
    const int64_t cell_r_step = n * (cell_sup[0] == 1 ? 1 : hs);                                \
    lstm_forward_step<T>(v + t * v_stride, cells + t * nh,                                      \
                         gate_r ? gate_r + t * gate_r_step : nullptr, acts + t * 4 * nh,        \
                         cells + (t + 1) * nh, cell_v ? cell_v + t * nh : nullptr,              \
                         cell_r ? cell_r + t * cell_r_step : nullptr, tanh_n + t * nh,          \
                         hs_all + (t + 1) * nh, n, hs, RowField(gate_sup, hs),                  \
                         RowField(cell_sum, hs), RowField(cell_sup, hs),                        \
                         static_cast<T>(gate_floor), static_cast<T>(cell_floor), l1_sums);      \
  }                                                                                             \
  extern "C" void dn_lstm_backward_step_##S(                                                     \
      const T* grad_h, const T* grad_out, T* grad_c, const T* acts, const T* cells,             \
      const T* tanh_n, const T* gate_v, const T* gate_r, const T* cell_v, const T* cell_r,      \
      T* grad_v, int64_t n, int64_t hs, const int64_t* gate_sup, const int64_t* cell_sum,       \
      const int64_t* cell_sup, double gate_l1, double cell_l1, int64_t t) {                     \
    const int64_t nh = n * hs;                                                                  \
    const int64_t gate_r_step = 4 * n * (gate_sup[0] == 1 ? 1 : hs);                            \
    const int64_t cell_r_step = n * (cell_sup[0] == 1 ? 1 : hs);                                \
    lstm_backward_step<T>(grad_h, grad_out ? grad_out + t * nh : nullptr, grad_c,               \
                          acts + t * 4 * nh, cells + t * nh, tanh_n + t * nh,                   \
                          gate_v ? gate_v + t * 4 * nh : nullptr,                               \
                          gate_r ? gate_r + t * gate_r_step : nullptr,                          \
                          cell_v ? cell_v + t * nh : nullptr,                                   \
                          cell_r ? cell_r + t * cell_r_step : nullptr, grad_v + t * 4 * nh, n,  \
                          hs, RowField(gate_sup, hs), RowField(cell_sum, hs),                   \
                          RowField(cell_sup, hs), static_cast<T>(gate_l1),                      \
                          static_cast<T>(cell_l1));                                             \
  }                                                                                             \
  extern "C" void dn_channel_forward_##S(const T* x, T* y, int64_t n, int64_t c, int64_t p,     \
                                         const int64_t* window, double floor, double alpha,     \
                                         double power, int threads) {                           \
    channel_forward<T>(x, y, n, c, p, Window{window[0], window[1], window[2]}, floor, alpha,    \
                       power, threads);                                                         \
  }                                                                                             \
  extern "C" double dn_channel_backward_##S(const T* g, const T* x, T* grad_x, int64_t n,       \
                                            int64_t c, int64_t p, const int64_t* window,        \
                                            double floor, double alpha, double power,           \
                                            int threads) {                                      \
    return channel_backward<T>(g, x, grad_x, n, c, p, Window{window[0], window[1], window[2]},  \
                               floor, alpha, power, threads);                                   \
  }                                                                                             \
  extern "C" double dn_field_forward_##S(const T* x, T* y, T* stats, const T* w, const T* b,    \
                                         int64_t n, int64_t c, int64_t p, int64_t groups,       \
                                         int centre, int scale, double floor, int with_l1,      \
                                         int threads) {                                         \
    return field_forward<T>(x, y, stats, w, b, n, c, p, groups, centre, scale, floor, with_l1,  \
                            threads);                                                           \
  }                                                                                             \
  extern "C" double dn_field_backward_##S(const T* g, const T* x, const T* stats, const T* w,   \
                                          T* grad_x, T* grad_w, T* grad_b, int64_t n,           \
                                          int64_t c, int64_t p, int64_t groups, int centre,     \
                                          int scale, double coef, int with_l1, int threads) {   \
    return field_backward<T>(g, x, stats, w, grad_x, grad_w, grad_b, n, c, p, groups, centre,   \
                             scale, coef, with_l1, threads);                                    \
  }                                                                                             \
  extern "C" void dn_box_rows_##S(const T* in, T* out, int64_t rows, int64_t len,               \
                                  const int64_t* window, int adjoint, int threads) {           \
    const Window w{window[0], window[1], window[2]};                                             \
    const std::vector<double> scale = Geometry::scales(len, w);                                  \
    box_rows<T>(in, out, rows, len, w, scale.data(), adjoint != 0, threads);                     \
  }

DN_EXPORT(float, f32)
DN_EXPORT(double, f64)
