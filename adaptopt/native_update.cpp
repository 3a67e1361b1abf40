// AdaptOpt's update as one vectorised pass over memory on the CPU: the C++ twin of functional._update,
// built by native_update.py with torch's C++ extension loader and DeepSpeed CPUAdam's flags.
//
// Per element, reading p, g, m, v (and x0) once and writing p, m, v once:
//   g  <- g * grad_scale                                   (the clipping factor, 1 when not clipping)
//   m' = m + (1 - b1)(g - m),   v' = b2 v + (1 - b2) g^2
//   with the cosine's sums:  d_prev = sqrt(v) / sqrt(bc2_prev) + eps,  d = sqrt(v') / sqrt(bc2) + eps,
//                            r = 1 / (d_prev d),  u = m / bc1_prev * d r      (u = m̂_{t-1} / d_prev)
//                            p' = p decay - step_size m' d_prev r             (= m' / d: one division for both)
//   without them:            p' = p decay - step_size m' / d
//   with Mechanic's x0:      p' += scale_shift (p - x0)
// and returns the sums [g.u, g.g, u.u] (want_stats) then [g.(p-x0), p.(p-x0), p.p, g.g] (x0 given) over all
// tensors, in float64. The scalars come as functional._pack_scalars' rows (float64, one row per tensor).
//
// float32 runs on AVX-512 (16 lanes) or AVX2 (8 lanes), chosen at build time by ADAPTOPT_SIMD_AVX512 /
// ADAPTOPT_SIMD_AVX2 (native_update.py picks by the CPU it runs on); float64 (the tests' precision) and the
// tails run the same template on one lane. Sums accumulate per block of BLOCK elements in the vector lanes
// and then in float64, so they do not depend on the number of threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#if defined(ADAPTOPT_SIMD_AVX512) || defined(ADAPTOPT_SIMD_AVX2)
#include <immintrin.h>
#endif

namespace {

template <typename T>
struct Lane1 {  // one element at a time: float64, scalar builds, and the tail of each block
    using Scalar = T;
    using V = T;
    static constexpr int W = 1;
    static V load(const T* x) { return *x; }
    static void store(T* x, V a) { *x = a; }
    static V set1(T a) { return a; }
    static V add(V a, V b) { return a + b; }
    static V sub(V a, V b) { return a - b; }
    static V mul(V a, V b) { return a * b; }
    static V div(V a, V b) { return a / b; }
    static V fma(V a, V b, V c) { return a * b + c; }
    static V sqrt(V a) { return std::sqrt(a); }
    static double hsum(V a) { return a; }
};

#if defined(ADAPTOPT_SIMD_AVX512)
struct Simd {
    using Scalar = float;
    using V = __m512;
    static constexpr int W = 16;
    static V load(const float* x) { return _mm512_loadu_ps(x); }
    static void store(float* x, V a) { _mm512_storeu_ps(x, a); }
    static V set1(float a) { return _mm512_set1_ps(a); }
    static V add(V a, V b) { return _mm512_add_ps(a, b); }
    static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V div(V a, V b) { return _mm512_div_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V sqrt(V a) { return _mm512_sqrt_ps(a); }
    static double hsum(V a)
    {
        alignas(64) float x[16];
        _mm512_store_ps(x, a);
        double s = 0.0;
        for (float e : x) s += e;
        return s;
    }
};
#elif defined(ADAPTOPT_SIMD_AVX2)
struct Simd {
    using Scalar = float;
    using V = __m256;
    static constexpr int W = 8;
    static V load(const float* x) { return _mm256_loadu_ps(x); }
    static void store(float* x, V a) { _mm256_storeu_ps(x, a); }
    static V set1(float a) { return _mm256_set1_ps(a); }
    static V add(V a, V b) { return _mm256_add_ps(a, b); }
    static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V div(V a, V b) { return _mm256_div_ps(a, b); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V sqrt(V a) { return _mm256_sqrt_ps(a); }
    static double hsum(V a)
    {
        alignas(32) float x[8];
        _mm256_store_ps(x, a);
        double s = 0.0;
        for (float e : x) s += e;
        return s;
    }
};
#else
using Simd = Lane1<float>;
#endif

template <typename T>
struct Lanes {  // the widest lanes for T
    using type = Lane1<T>;
};
template <>
struct Lanes<float> {
    using type = Simd;
};

// functional._pack_scalars' columns.
enum Column {
    STEP_SIZE, DECAY, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS,
    INV_BC2_SQRT, INV_BC1_PREV, INV_BC2_PREV_SQRT, GRAD_SCALE, SCALE_SHIFT, N_COLUMNS
};
// The sums' accumulators.
enum Sum { GU, GG, UU, GD, PD, PP, N_SUMS };

constexpr int64_t BLOCK = 4096;        // elements whose sums accumulate in the lanes before float64
constexpr int64_t GRAIN_BLOCKS = 16;   // blocks per thread task at least (64k elements)

// Updates n elements from x (p, g, m, v, x0 at offset 0) and adds their sums to acc.
template <class S, bool STATS, bool DIST>
void update_range(typename S::Scalar* p, const typename S::Scalar* g, typename S::Scalar* m,
                  typename S::Scalar* v, const typename S::Scalar* x0, int64_t n, const double* c,
                  double* acc)
{
    using T = typename S::Scalar;
    using V = typename S::V;
    const V step_size = S::set1(T(c[STEP_SIZE])), decay = S::set1(T(c[DECAY]));
    const V omb1 = S::set1(T(c[ONE_MINUS_BETA1])), beta2 = S::set1(T(c[BETA2]));
    const V omb2 = S::set1(T(c[ONE_MINUS_BETA2])), eps = S::set1(T(c[EPS]));
    const V inv_bc2 = S::set1(T(c[INV_BC2_SQRT])), inv_bc1_prev = S::set1(T(c[INV_BC1_PREV]));
    const V inv_bc2_prev = S::set1(T(c[INV_BC2_PREV_SQRT])), grad_scale = S::set1(T(c[GRAD_SCALE]));
    const V shift = S::set1(T(c[SCALE_SHIFT])), one = S::set1(T(1)), zero = S::set1(T(0));
    V gu = zero, gg = zero, uu = zero, gd = zero, pd = zero, pp = zero;
    int64_t i = 0;
    for (; i + S::W <= n; i += S::W) {
        const V gi = S::mul(S::load(g + i), grad_scale);
        const V mi = S::load(m + i), vi = S::load(v + i), pi = S::load(p + i);
        const V m_new = S::fma(S::sub(gi, mi), omb1, mi);
        const V v_new = S::fma(S::mul(gi, gi), omb2, S::mul(vi, beta2));
        V p_new;
        if (STATS) {
            const V d_prev = S::fma(S::sqrt(vi), inv_bc2_prev, eps);
            const V d = S::fma(S::sqrt(v_new), inv_bc2, eps);
            const V r = S::div(one, S::mul(d_prev, d));
            const V u = S::mul(S::mul(mi, inv_bc1_prev), S::mul(d, r));
            gu = S::fma(gi, u, gu);
            uu = S::fma(u, u, uu);
            p_new = S::sub(S::mul(pi, decay), S::mul(step_size, S::mul(m_new, S::mul(d_prev, r))));
        } else {
            const V d = S::fma(S::sqrt(v_new), inv_bc2, eps);
            p_new = S::sub(S::mul(pi, decay), S::div(S::mul(step_size, m_new), d));
        }
        if (STATS || DIST) gg = S::fma(gi, gi, gg);
        if (DIST) {
            const V delta = S::sub(pi, S::load(x0 + i));  // x_t - x0, before the update
            gd = S::fma(gi, delta, gd);
            pd = S::fma(pi, delta, pd);
            pp = S::fma(pi, pi, pp);
            p_new = S::fma(shift, delta, p_new);
        }
        S::store(p + i, p_new);
        S::store(m + i, m_new);
        S::store(v + i, v_new);
    }
    acc[GU] += S::hsum(gu), acc[GG] += S::hsum(gg), acc[UU] += S::hsum(uu);
    acc[GD] += S::hsum(gd), acc[PD] += S::hsum(pd), acc[PP] += S::hsum(pp);
    if (S::W > 1 && i < n)
        update_range<Lane1<T>, STATS, DIST>(p + i, g + i, m + i, v + i, DIST ? x0 + i : nullptr, n - i, c, acc);
}

template <typename T, bool STATS, bool DIST>
void update_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                   const at::Tensor* x0, const double* c, double* total)
{
    const int64_t n = p.numel();
    const int64_t n_blocks = (n + BLOCK - 1) / BLOCK;
    std::vector<double> partial(n_blocks * N_SUMS, 0.0);
    T* pp = p.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    T* mp = m.data_ptr<T>();
    T* vp = v.data_ptr<T>();
    const T* xp = DIST ? x0->data_ptr<T>() : nullptr;
    at::parallel_for(0, n_blocks, GRAIN_BLOCKS, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
            const int64_t start = b * BLOCK;
            update_range<typename Lanes<T>::type, STATS, DIST>(
                pp + start, gp + start, mp + start, vp + start, DIST ? xp + start : nullptr,
                std::min(BLOCK, n - start), c, partial.data() + b * N_SUMS);
        }
    });
    for (int64_t b = 0; b < n_blocks; ++b)
        for (int k = 0; k < N_SUMS; ++k) total[k] += partial[b * N_SUMS + k];
}

template <bool STATS, bool DIST>
void update_any(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
                const at::Tensor* x0, const double* c, double* total)
{
    if (p.scalar_type() == at::kFloat)
        update_tensor<float, STATS, DIST>(p, g, m, v, x0, c, total);
    else
        update_tensor<double, STATS, DIST>(p, g, m, v, x0, c, total);
}

void check(const at::Tensor& t, const at::Tensor& p, const char* what, size_t i)
{
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == p.scalar_type() &&
                    t.numel() == p.numel(),
                "adaptopt native update: ", what, "[", i, "] must be a contiguous CPU tensor of the dtype and size "
                "of its parameter (float32 or float64)");
}

}  // namespace

at::Tensor step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& x0s, const at::Tensor& scalars, bool want_stats)
{
    const bool dist = !x0s.empty();
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && (!dist || x0s.size() == n),
                "adaptopt native update: params, grads, exp_avgs, exp_avg_sqs (and x0s) must have one entry each");
    TORCH_CHECK(scalars.scalar_type() == at::kDouble && scalars.is_contiguous() && scalars.dim() == 2 &&
                    scalars.size(0) == static_cast<int64_t>(n) && scalars.size(1) == N_COLUMNS,
                "adaptopt native update: scalars must be a contiguous float64 tensor of shape [len(params), ",
                N_COLUMNS, "] (functional._pack_scalars)");
    const double* rows = scalars.data_ptr<double>();
    double total[N_SUMS] = {0.0};
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor& p = params[i];
        TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                    "adaptopt native update: params[", i, "] is ", p.scalar_type(), "; it runs float32 and float64");
        check(p, p, "params", i), check(grads[i], p, "grads", i), check(exp_avgs[i], p, "exp_avgs", i);
        check(exp_avg_sqs[i], p, "exp_avg_sqs", i);
        if (dist) check(x0s[i], p, "x0s", i);
        const at::Tensor* x0 = dist ? &x0s[i] : nullptr;
        const double* c = rows + i * N_COLUMNS;
        if (want_stats && dist) update_any<true, true>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], x0, c, total);
        else if (want_stats) update_any<true, false>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], x0, c, total);
        else if (dist) update_any<false, true>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], x0, c, total);
        else update_any<false, false>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], x0, c, total);
    }
    std::vector<double> out;
    if (want_stats) out.insert(out.end(), {total[GU], total[GG], total[UU]});
    if (dist) out.insert(out.end(), {total[GD], total[PD], total[PP], total[GG]});
    return torch::tensor(out, torch::dtype(torch::kFloat64));
}

const char* simd()
{
#if defined(ADAPTOPT_SIMD_AVX512)
    return "avx512";
#elif defined(ADAPTOPT_SIMD_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("step", &step, "AdaptOpt's update of lists of tensors in one pass each; returns the float64 sums");
    m.def("simd", &simd, "the vector instructions this build uses for float32");
}
