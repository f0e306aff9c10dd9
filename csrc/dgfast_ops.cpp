// dgfast C++ CPU ops: the fused DoG sampler step and the DiT block's elementwise work.
//
// Each op is the one-pass twin of a plain-torch formula in dgfast/ops.py and is tested against it
// (tests/test_op_<op>.py). Built by setup.py as dgfast._C, or JIT-loaded by dgfast/_build.py, with
// -O3 -fopenmp -ffp-contract=off -fno-trapping-math. No FMA contraction: every float op rounds
// where torch's op-by-op kernels round, which makes guided_step bit-equal to the reference.
// -fno-trapping-math changes no value; it lets GCC if-convert the clamps so those loops vectorize.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and one is picked per CPU: the
// guided step's loops as target_clones (the loader's ifunc resolver picks), the row and GELU
// kernels as per-ISA instantiations at the native vector width (cpu_isa picks; see f32x8). One
// binary, full-width SIMD on each machine, still runs on older CPUs. Every ISA returns the same
// bits: the code has no FMA (contraction off) and its sums have a fixed order, so the vector
// width cannot change a result.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DGFAST_X86 1
#define DGFAST_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DGFAST_X86 0
#define DGFAST_SIMD
#endif

namespace {

// The row and GELU kernels are instantiated per ISA at the native vector width (see f32x8) and
// picked here: the best the CPU has, or one named by set_cpu_isa (tests compare every ISA's bits).
enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"base", "avx2", "avx512f"};

int best_isa() {
#if DGFAST_X86
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2")) return kAvx2;
#endif
  return kBase;
}

std::atomic<int> g_isa{-1};

int cpu_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) g_isa.store(v = best_isa(), std::memory_order_relaxed);
  return v;
}

// Selects the ISA of the row and GELU kernels ("best", or one this CPU supports); returns the
// previous one's name.
std::string set_cpu_isa(const std::string& name) {
  const std::string previous = kIsaNames[cpu_isa()];
  int want = -1;
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) want = i;
  if (name == "best") want = best_isa();
  TORCH_CHECK(want >= 0, "set_cpu_isa: unknown ISA '", name, "'; expected best, base, avx2 or avx512f");
  TORCH_CHECK(want <= best_isa(), "set_cpu_isa: this CPU does not support ", name, " (best: ",
              kIsaNames[best_isa()], ")");
  g_isa.store(want, std::memory_order_relaxed);
  return previous;
}

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
}

// t, or a contiguous copy when its dims from `first` on are not packed (innermost stride 1).
// Dims before `first` may keep any stride: channel slices, rows of a larger draw, chunk views.
at::Tensor packed_from(const at::Tensor& t, int64_t first) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return t.contiguous();
    expected *= t.size(d);
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// exp with torch's bits
// ---------------------------------------------------------------------------------------------
// torch.exp on CPU float32 is not Sleef here: in torch's MKL builds (the x86 wheels) at::vml::vexp
// calls MKL's vmsExp in high-accuracy mode, and libtorch_cpu exports that symbol. Calling it on
// small per-chunk buffers gives torch's exact bits at MKL speed. Where the symbol is missing (weak,
// so null) or a probe finds it disagreeing with at::exp, the buffer goes through at::exp_out
// itself: slower (one dispatcher call per chunk), same bits by construction.
extern "C" __attribute__((weak)) void vmsExp(int64_t n, const float* a, float* r, int64_t mode);
constexpr int64_t kVmlHighAccuracy = 0x2, kVmlErrmodeIgnore = 0x100, kVmlFtzDazOff = 0x140000;

using ExpFn = void (*)(const float* in, float* out, int64_t n);

void exp_mkl(const float* in, float* out, int64_t n) {
  vmsExp(n, in, out, kVmlHighAccuracy | kVmlFtzDazOff | kVmlErrmodeIgnore);
}

void exp_torch(const float* in, float* out, int64_t n) {
  at::Tensor o = at::from_blob(out, {n}, at::kFloat);
  at::exp_out(o, at::from_blob(const_cast<float*>(in), {n}, at::kFloat));
}

ExpFn pick_exp() {
  const char* force = std::getenv("DGFAST_CPP_EXP");  // "torch": the fallback path, for its test
  if (vmsExp == nullptr || (force != nullptr && std::string(force) == "torch")) return exp_torch;
  // Probe exp's whole finite-result range (denormal results included), past both ends, specials.
  std::vector<float> in;
  for (int i = 0; i <= 40000; ++i) in.push_back(-110.0f + 200.0f * static_cast<float>(i) / 40000.0f);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-40f, 88.72f, 88.73f, -103.9f, -104.0f, 1e30f,
                  -1e30f, INFINITY, -INFINITY, NAN})
    in.push_back(v);
  const auto n = static_cast<int64_t>(in.size());
  std::vector<float> a(n), b(n);
  exp_mkl(in.data(), a.data(), n);
  exp_torch(in.data(), b.data(), n);
  for (int64_t i = 0; i < n; ++i)
    if (!(std::isnan(a[i]) && std::isnan(b[i])) && std::memcmp(&a[i], &b[i], sizeof(float)) != 0)
      return exp_torch;
  return exp_mkl;
}

ExpFn exp_impl() {
  static const ExpFn fn = pick_exp();  // once per process, thread-safe
  return fn;
}

// ---------------------------------------------------------------------------------------------
// guided_step
// ---------------------------------------------------------------------------------------------

constexpr int64_t kChunk = 1024;  // elements per inner step: buffers stay in L1

inline float clamp1(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }  // NaN stays NaN

// One stretch of at most kChunk elements inside one (sample, channel) plane. Every line is the
// reference's float32 op order (docs/upstream_sampling.md §2.7/§2.8); pre == nullptr: eps is the fine-tuned one.
DGFAST_SIMD void step_chunk(const float* x, const float* ft, const float* pre, const float* var,
                            const float* z, float* out, int64_t len, const float* cf, float s,
                            bool clip, bool ddim, ExpFn exp_fn) {
  float half_lv[kChunk], stdv[kChunk];
  const float A = cf[0], B = cf[1];
  // The guided eps inline (pre is loop-invariant: GCC unswitches the loops on it).
  auto eps_at = [&](int64_t j) { return pre != nullptr ? pre[j] + s * (ft[j] - pre[j]) : ft[j]; };
  if (ddim) {
    const float c2 = cf[2], c3 = cf[3], c4 = cf[4];
    for (int64_t j = 0; j < len; ++j) {
      float x0 = A * x[j] - B * eps_at(j);
      if (clip) x0 = clamp1(x0);
      const float eps2 = (A * x[j] - x0) / B;
      out[j] = (x0 * c2 + c3 * eps2) + c4 * z[j];
    }
    return;
  }
  const float C1 = cf[2], C2 = cf[3], Lmin = cf[4], Lmax = cf[5], mask = cf[6];
  for (int64_t j = 0; j < len; ++j) {
    float x0 = A * x[j] - B * eps_at(j);
    if (clip) x0 = clamp1(x0);
    out[j] = C1 * x0 + C2 * x[j];
    const float frac = (var[j] + 1.0f) / 2.0f;
    half_lv[j] = 0.5f * (frac * Lmax + (1.0f - frac) * Lmin);
  }
  exp_fn(half_lv, stdv, len);
  // mask * std first, as the reference: at the last step (mask 0) an inf std still gives NaN.
  for (int64_t j = 0; j < len; ++j) out[j] = out[j] + (mask * stdv[j]) * z[j];
}

at::Tensor guided_step(const at::Tensor& x_in, const at::Tensor& ft_in,
                       const std::optional<at::Tensor>& pre_in, const at::Tensor& noise_in,
                       const std::vector<double>& coefs, double scale, int64_t k, bool is_ddim,
                       bool clip) {
  const char* op = "guided_step";
  check_f32(x_in, op, "x");
  check_f32(ft_in, op, "out_ft");
  check_f32(noise_in, op, "noise");
  TORCH_CHECK(x_in.dim() >= 2, op, ": x must be (n, C, ...), got shape ", x_in.sizes());
  const int64_t n = x_in.size(0), C = x_in.size(1);
  const auto tail = x_in.sizes().slice(2);
  TORCH_CHECK(noise_in.sizes() == x_in.sizes(), op, ": noise must have x's shape ", x_in.sizes(),
              ", got ", noise_in.sizes());
  const int64_t ft_channels = is_ddim ? C : 2 * C;
  TORCH_CHECK(ft_in.dim() == x_in.dim() && ft_in.size(0) == n && ft_in.size(1) >= ft_channels &&
                  ft_in.sizes().slice(2) == tail,
              op, ": out_ft must be (", n, ", >=", ft_channels, ", ", tail, ") for x of shape ",
              x_in.sizes(), is_ddim ? "" : " (eps then variance channels)", ", got ",
              ft_in.sizes());
  TORCH_CHECK(coefs.size() == 7, op, ": coefs must hold 7 values (one schedule row), got ",
              coefs.size());
  TORCH_CHECK(k >= 0 && k <= C, op, ": k (guided channels) must be in [0, ", C, "], got ", k);
  const bool guided = k > 0;
  if (guided) {
    TORCH_CHECK(pre_in.has_value(), op, ": out_guide is None but k = ", k, " channels are guided");
    const at::Tensor& p = *pre_in;
    check_f32(p, op, "out_guide");
    TORCH_CHECK(p.dim() == x_in.dim() && p.size(0) == n && p.size(1) >= k &&
                    p.sizes().slice(2) == tail,
                op, ": out_guide must be (", n, ", >=", k, ", ", tail, "), got ", p.sizes());
  }

  const at::Tensor x = packed_from(x_in, 2), ft = packed_from(ft_in, 2),
                   z = packed_from(noise_in, 2);
  const at::Tensor pre = guided ? packed_from(*pre_in, 2) : at::Tensor();
  at::Tensor out = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t P = c10::multiply_integers(tail), total = n * C * P;
  if (total == 0) return out;

  float cf[7];
  for (int i = 0; i < 7; ++i) cf[i] = static_cast<float>(coefs[i]);  // as torch.tensor(v, float32)
  const float s = static_cast<float>(scale);                         // as torch's scalar multiply
  const ExpFn exp_fn = is_ddim ? nullptr : exp_impl();
  const float *xp = x.data_ptr<float>(), *fp = ft.data_ptr<float>(), *zp = z.data_ptr<float>();
  const float* pp = guided ? pre.data_ptr<float>() : nullptr;
  float* op_out = out.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), fs0 = ft.stride(0), fs1 = ft.stride(1),
                zs0 = z.stride(0), zs1 = z.stride(1), ps0 = guided ? pre.stride(0) : 0,
                ps1 = guided ? pre.stride(1) : 0;

  at::parallel_for(0, total, 16 * kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t q = idx / P, off = idx % P, i = q / C, c = q % C;  // plane (i, c), offset
      const int64_t len = std::min({end - idx, P - off, kChunk});
      const float* pre_row = c < k ? pp + i * ps0 + c * ps1 + off : nullptr;
      const float* var_row = is_ddim ? nullptr : fp + i * fs0 + (C + c) * fs1 + off;
      step_chunk(xp + i * xs0 + c * xs1 + off, fp + i * fs0 + c * fs1 + off, pre_row, var_row,
                 zp + i * zs0 + c * zs1 + off, op_out + idx, len, cf, s, clip, is_ddim, exp_fn);
      idx += len;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// guided_step_modes: the samplers' modes (dgfast/samplers.py), same op order as the torch twin
// ---------------------------------------------------------------------------------------------
// linear      x0 = A*x - B*d (clamp); out = R*x + P*x0, + Q*d, + T*(x0 - prev), + S*z; state x0
// flow_euler  out = x + h*d; state d
// flow_heun   out = x + h*(prev + d)
// prev, z, state may be null (term skipped / not written).

// A mode's number is its index in dgfast.ops.SAMPLER_MODES (ddpm 0, ddim 1: the guided_step above).
enum StepMode : int64_t { kLinear = 2, kFlowEuler = 3, kFlowHeun = 4 };

DGFAST_SIMD void step_chunk_modes(const float* x, const float* ft, const float* pre, const float* z,
                                  const float* prev, float* out, float* state, int64_t len,
                                  const float* cf, float s, bool clip, int64_t mode) {
  float eps_buf[kChunk];
  const float* eps = ft;
  if (pre != nullptr) {
    for (int64_t j = 0; j < len; ++j) eps_buf[j] = pre[j] + s * (ft[j] - pre[j]);
    eps = eps_buf;
  }
  if (mode == kFlowEuler) {
    for (int64_t j = 0; j < len; ++j) out[j] = x[j] + cf[0] * eps[j];
    if (state != nullptr) std::memcpy(state, eps, len * sizeof(float));
    return;
  }
  if (mode == kFlowHeun) {
    for (int64_t j = 0; j < len; ++j) out[j] = x[j] + cf[0] * (prev[j] + eps[j]);
    return;
  }
  const float A = cf[0], B = cf[1], R = cf[2], P = cf[3], Q = cf[4], T = cf[5], S = cf[6];
  for (int64_t j = 0; j < len; ++j) {
    float x0 = A * x[j] - B * eps[j];
    if (clip) x0 = clamp1(x0);
    float o = R * x[j] + P * x0;
    o = o + Q * eps[j];
    if (prev != nullptr) o = o + T * (x0 - prev[j]);
    if (z != nullptr) o = o + S * z[j];
    out[j] = o;
    if (state != nullptr) state[j] = x0;
  }
}

// Returns [out] or [out, state].
std::vector<at::Tensor> guided_step_modes(const at::Tensor& x_in, const at::Tensor& ft_in,
                                          const std::optional<at::Tensor>& pre_in,
                                          const std::optional<at::Tensor>& noise_in,
                                          const std::optional<at::Tensor>& prev_in,
                                          const std::vector<double>& coefs, double scale, int64_t k,
                                          int64_t mode, bool clip, bool return_state) {
  const char* op = "guided_step_modes";
  TORCH_CHECK(mode == kLinear || mode == kFlowEuler || mode == kFlowHeun, op,
              ": step_mode must be 2 (linear), 3 (flow_euler) or 4 (flow_heun), got ", mode);
  check_f32(x_in, op, "x");
  check_f32(ft_in, op, "out_ft");
  TORCH_CHECK(x_in.dim() >= 2, op, ": x must be (n, C, ...), got shape ", x_in.sizes());
  const int64_t n = x_in.size(0), C = x_in.size(1);
  const auto tail = x_in.sizes().slice(2);
  TORCH_CHECK(ft_in.dim() == x_in.dim() && ft_in.size(0) == n && ft_in.size(1) >= C &&
                  ft_in.sizes().slice(2) == tail,
              op, ": out_ft must be (", n, ", >=", C, ", ", tail, "), got ", ft_in.sizes());
  TORCH_CHECK(coefs.size() >= 1 && coefs.size() <= 7, op, ": coefs must hold 1..7 values, got ",
              coefs.size());
  TORCH_CHECK(k >= 0 && k <= C, op, ": k (guided channels) must be in [0, ", C, "], got ", k);
  const bool guided = k > 0;
  if (guided) {
    TORCH_CHECK(pre_in.has_value(), op, ": out_guide is None but k = ", k, " channels are guided");
    check_f32(*pre_in, op, "out_guide");
    TORCH_CHECK(pre_in->dim() == x_in.dim() && pre_in->size(0) == n && pre_in->size(1) >= k &&
                    pre_in->sizes().slice(2) == tail,
                op, ": out_guide must be (", n, ", >=", k, ", ", tail, "), got ", pre_in->sizes());
  }
  const bool has_noise = noise_in.has_value() && mode == kLinear;
  if (has_noise) {
    check_f32(*noise_in, op, "noise");
    TORCH_CHECK(noise_in->sizes() == x_in.sizes(), op, ": noise must have x's shape ", x_in.sizes(),
                ", got ", noise_in->sizes());
  }
  TORCH_CHECK(mode != kFlowHeun || prev_in.has_value(), op, ": flow_heun needs prev");
  const bool has_prev = prev_in.has_value();
  if (has_prev) {
    TORCH_CHECK(mode != kFlowEuler, op, ": flow_euler takes no prev");
    check_f32(*prev_in, op, "prev");
    TORCH_CHECK(prev_in->sizes() == x_in.sizes(), op, ": prev must have x's shape ", x_in.sizes(),
                ", got ", prev_in->sizes());
  }
  TORCH_CHECK(!return_state || mode != kFlowHeun, op, ": flow_heun has no state to return");

  const at::Tensor x = packed_from(x_in, 2), ft = packed_from(ft_in, 2);
  const at::Tensor pre = guided ? packed_from(*pre_in, 2) : at::Tensor();
  const at::Tensor z = has_noise ? packed_from(*noise_in, 2) : at::Tensor();
  const at::Tensor pv = has_prev ? packed_from(*prev_in, 2) : at::Tensor();
  const auto opts = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = at::empty(x_in.sizes(), opts);
  at::Tensor state = return_state ? at::empty(x_in.sizes(), opts) : at::Tensor();
  std::vector<at::Tensor> result{out};
  if (return_state) result.push_back(state);
  const int64_t P = c10::multiply_integers(tail), total = n * C * P;
  if (total == 0) return result;

  float cf[7] = {0, 0, 0, 0, 0, 0, 0};
  for (size_t i = 0; i < coefs.size(); ++i) cf[i] = static_cast<float>(coefs[i]);
  const float s = static_cast<float>(scale);
  const float *xp = x.data_ptr<float>(), *fp = ft.data_ptr<float>();
  const float* pp = guided ? pre.data_ptr<float>() : nullptr;
  const float* zp = has_noise ? z.data_ptr<float>() : nullptr;
  const float* vp = has_prev ? pv.data_ptr<float>() : nullptr;
  float* op_out = out.data_ptr<float>();
  float* sp = return_state ? state.data_ptr<float>() : nullptr;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), fs0 = ft.stride(0), fs1 = ft.stride(1),
                ps0 = guided ? pre.stride(0) : 0, ps1 = guided ? pre.stride(1) : 0,
                zs0 = has_noise ? z.stride(0) : 0, zs1 = has_noise ? z.stride(1) : 0,
                vs0 = has_prev ? pv.stride(0) : 0, vs1 = has_prev ? pv.stride(1) : 0;

  at::parallel_for(0, total, 16 * kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t q = idx / P, off = idx % P, i = q / C, c = q % C;  // plane (i, c), offset
      const int64_t len = std::min({end - idx, P - off, kChunk});
      step_chunk_modes(xp + i * xs0 + c * xs1 + off, fp + i * fs0 + c * fs1 + off,
                       c < k ? pp + i * ps0 + c * ps1 + off : nullptr,
                       has_noise ? zp + i * zs0 + c * zs1 + off : nullptr,
                       has_prev ? vp + i * vs0 + c * vs1 + off : nullptr, op_out + idx,
                       sp != nullptr ? sp + idx : nullptr, len, cf, s, clip, mode);
      idx += len;
    }
  });
  return result;
}

// ---------------------------------------------------------------------------------------------
// adaln_modulate / gated_residual_modulate
// ---------------------------------------------------------------------------------------------
// The row loops run on GCC/Clang vector-extension types of the machine's native width: W = 16
// floats (one zmm) on AVX-512, W = 8 (one ymm) elsewhere. Vectors wider than the target's
// registers compile badly (an f32x16 on AVX2 went through the stack and integer registers, a
// third of adaln_modulate's time), so each ISA gets its own instantiation and the CPU picks one
// at run time (run_rows). Sums keep 32 partial sums, one per offset mod 32 (two f32x16 or four
// f32x8 accumulators: the same lanes), combined by one fixed tree in double (lanes_total), so
// every ISA returns the same bits.
// Corrected two-pass moments: the second pass sums d = x - mean0 and d^2, and the sum of d repairs
// the float rounding of the first-pass mean, which matters when a row's mean is large next to its
// spread. The row is in L1 by then.

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
// The vector helpers below are inlined into one ISA's function, so no vector crosses a call
// boundary; GCC's note that passing one by value would depend on the ISA does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int64_t kBlock = 32;  // floats per step of the vector loops (and partial sums kept)

template <int W> struct Vec;
// `u`: a 4-byte-aligned twin for unaligned loads and stores in native vectors.
template <> struct Vec<16> {
  typedef f32x16 v;
  typedef float u __attribute__((vector_size(64), aligned(4), may_alias));
};
template <> struct Vec<8> {
  typedef f32x8 v;
  typedef float u __attribute__((vector_size(32), aligned(4), may_alias));
};
template <int W> using V = typename Vec<W>::v;
template <int W> using Acc = V<W>[kBlock / W];  // the 32 partial sums

#define DGFAST_INLINE inline __attribute__((always_inline))

template <int W> DGFAST_INLINE V<W> vload(const float* p) {
  return *reinterpret_cast<const typename Vec<W>::u*>(p);
}
template <int W> DGFAST_INLINE void vstore(float* p, V<W> v) {
  *reinterpret_cast<typename Vec<W>::u*>(p) = v;
}

// Partial sum k (offset k mod 32) is lane k % W of accumulator k / W. Tree: s8[l] = (p[l] + p[l+16])
// + (p[l+8] + p[l+24]) in double, then halves: five dependent adds instead of a 32-long chain.
template <int W> DGFAST_INLINE double lanes_total(const Acc<W>& acc) {
  f64x8 s8;
  if constexpr (W == 16) {
    const f64x8 a0 = __builtin_convertvector(__builtin_shufflevector(acc[0], acc[0], 0, 1, 2, 3, 4, 5, 6, 7), f64x8),
                a1 = __builtin_convertvector(__builtin_shufflevector(acc[0], acc[0], 8, 9, 10, 11, 12, 13, 14, 15), f64x8),
                b0 = __builtin_convertvector(__builtin_shufflevector(acc[1], acc[1], 0, 1, 2, 3, 4, 5, 6, 7), f64x8),
                b1 = __builtin_convertvector(__builtin_shufflevector(acc[1], acc[1], 8, 9, 10, 11, 12, 13, 14, 15), f64x8);
    s8 = (a0 + b0) + (a1 + b1);
  } else {
    s8 = (__builtin_convertvector(acc[0], f64x8) + __builtin_convertvector(acc[2], f64x8)) +
         (__builtin_convertvector(acc[1], f64x8) + __builtin_convertvector(acc[3], f64x8));
  }
  const f64x4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

template <int W> DGFAST_INLINE double row_sum(const float* x, int64_t D) {
  Acc<W> acc = {};
  int64_t j = 0;
  for (; j + kBlock <= D; j += kBlock)
    for (int k = 0; k < kBlock / W; ++k) acc[k] += vload<W>(x + j + k * W);
  double t = lanes_total<W>(acc);
  for (; j < D; ++j) t += x[j];
  return t;
}

// y = LayerNorm(x) * (1 + scale) + shift, given the row's sum.
template <int W> DGFAST_INLINE void modulate_row(const float* x, double sum, const float* shift,
                                                 const float* scale, float eps, int64_t D, float* y) {
  const float mean0 = static_cast<float>(sum / static_cast<double>(D));
  Acc<W> s = {}, q = {};
  int64_t j = 0;
  for (; j + kBlock <= D; j += kBlock)
    for (int k = 0; k < kBlock / W; ++k) {
      const V<W> d = vload<W>(x + j + k * W) - mean0;
      s[k] += d;
      q[k] += d * d;
    }
  double sd = lanes_total<W>(s), sq = lanes_total<W>(q);
  for (; j < D; ++j) {
    const double d = x[j] - mean0;
    sd += d;
    sq += d * d;
  }
  const double dmean = sd / static_cast<double>(D);
  const double var = std::max(sq / static_cast<double>(D) - dmean * dmean, 0.0);
  const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps)), dm = static_cast<float>(dmean);
  // (x - mean0) is exact where it matters (x near mean0); dm is small and carries the correction.
  for (j = 0; j + W <= D; j += W)
    vstore<W>(y + j, (((vload<W>(x + j) - mean0) - dm) * rstd) * (1.0f + vload<W>(scale + j)) + vload<W>(shift + j));
  for (; j < D; ++j) y[j] = (((x[j] - mean0) - dm) * rstd) * (1.0f + scale[j]) + shift[j];
}

struct RowArgs {
  const float *h, *y, *gate, *shift, *scale;
  int64_t hs0, hs1, ys0, ys1, gs0, ss0, cs0;  // strides: h/y (sample, token), gate/shift/scale rows
  float *h_new, *out;                         // contiguous (N*T, D)
  int64_t T, D;
  float eps;
};

template <int W> DGFAST_INLINE void adaln_rows(const RowArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / a.T, t = r % a.T;
    const float* h = a.h + i * a.hs0 + t * a.hs1;
    modulate_row<W>(h, row_sum<W>(h, a.D), a.shift + i * a.ss0, a.scale + i * a.cs0, a.eps, a.D,
                    a.out + r * a.D);
  }
}

// h_new = h + gate * y and its sum in one pass, then the modulation from the row still in L1.
template <int W> DGFAST_INLINE void gated_rows(const RowArgs& a, int64_t r0, int64_t r1) {
  const int64_t D = a.D;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / a.T, t = r % a.T;
    const float *h = a.h + i * a.hs0 + t * a.hs1, *y = a.y + i * a.ys0 + t * a.ys1,
                *g = a.gate + i * a.gs0;
    float* hn = a.h_new + r * D;
    Acc<W> acc = {};
    int64_t j = 0;
    for (; j + kBlock <= D; j += kBlock)
      for (int k = 0; k < kBlock / W; ++k) {
        const int64_t o = j + k * W;
        const V<W> v = vload<W>(h + o) + vload<W>(g + o) * vload<W>(y + o);
        vstore<W>(hn + o, v);
        acc[k] += v;
      }
    double sum = lanes_total<W>(acc);
    for (; j < D; ++j) {
      hn[j] = h[j] + g[j] * y[j];
      sum += hn[j];
    }
    modulate_row<W>(hn, sum, a.shift + i * a.ss0, a.scale + i * a.cs0, a.eps, D, a.out + r * D);
  }
}

template <int W> DGFAST_INLINE void rows_w(const RowArgs& a, int64_t r0, int64_t r1, bool gated) {
  if (gated)
    gated_rows<W>(a, r0, r1);
  else
    adaln_rows<W>(a, r0, r1);
}

#if DGFAST_X86
__attribute__((target("avx512f"))) void rows_avx512(const RowArgs& a, int64_t r0, int64_t r1, bool gated) {
  rows_w<16>(a, r0, r1, gated);
}
__attribute__((target("avx2"))) void rows_avx2(const RowArgs& a, int64_t r0, int64_t r1, bool gated) {
  rows_w<8>(a, r0, r1, gated);
}
#endif
void rows_base(const RowArgs& a, int64_t r0, int64_t r1, bool gated) { rows_w<8>(a, r0, r1, gated); }

using RowsFn = void (*)(const RowArgs&, int64_t, int64_t, bool);

RowsFn rows_impl() {
  switch (cpu_isa()) {
#if DGFAST_X86
    case kAvx512: return rows_avx512;
    case kAvx2: return rows_avx2;
#endif
    default: return rows_base;
  }
}

// Checks h (N, T, D) and a (N, D) per-sample row tensor; returns it with a stride-1 last dim.
at::Tensor check_rows(const at::Tensor& v, const at::Tensor& h, const char* op, const char* name) {
  check_f32(v, op, name);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == h.size(0) && v.size(1) == h.size(2), op, ": ", name,
              " must be (N, D) = (", h.size(0), ", ", h.size(2), "), got ", v.sizes());
  return packed_from(v, 1);
}

at::Tensor check_tokens(const at::Tensor& h, const char* op, const char* name) {
  check_f32(h, op, name);
  TORCH_CHECK(h.dim() == 3, op, ": ", name, " must be (N, T, D), got shape ", h.sizes());
  return packed_from(h, 2);
}

void run_rows(const RowArgs& a, int64_t rows, bool gated) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.D, 1));
  const RowsFn fn = rows_impl();
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { fn(a, r0, r1, gated); });
}

at::Tensor adaln_modulate(const at::Tensor& h_in, const at::Tensor& shift_in,
                          const at::Tensor& scale_in, double eps) {
  const char* op = "adaln_modulate";
  const at::Tensor h = check_tokens(h_in, op, "h");
  const at::Tensor shift = check_rows(shift_in, h, op, "shift"),
                   scale = check_rows(scale_in, h, op, "scale");
  at::Tensor out = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  RowArgs a{h.data_ptr<float>(), nullptr, nullptr, shift.data_ptr<float>(),
            scale.data_ptr<float>(), h.stride(0), h.stride(1), 0, 0, 0, shift.stride(0),
            scale.stride(0), nullptr, out.data_ptr<float>(), h.size(1), h.size(2),
            static_cast<float>(eps)};
  run_rows(a, h.size(0) * h.size(1), false);
  return out;
}

std::vector<at::Tensor> gated_residual_modulate(const at::Tensor& h_in, const at::Tensor& gate_in,
                                                const at::Tensor& y_in, const at::Tensor& shift_in,
                                                const at::Tensor& scale_in, double eps) {
  const char* op = "gated_residual_modulate";
  const at::Tensor h = check_tokens(h_in, op, "h"), y = check_tokens(y_in, op, "y");
  TORCH_CHECK(y.sizes() == h.sizes(), op, ": y must have h's shape ", h.sizes(), ", got ",
              y.sizes());
  const at::Tensor gate = check_rows(gate_in, h, op, "gate"),
                   shift = check_rows(shift_in, h, op, "shift"),
                   scale = check_rows(scale_in, h, op, "scale");
  const auto opts = h.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor h_new = at::empty(h.sizes(), opts), out = at::empty(h.sizes(), opts);
  if (out.numel() == 0) return {h_new, out};
  RowArgs a{h.data_ptr<float>(), y.data_ptr<float>(), gate.data_ptr<float>(),
            shift.data_ptr<float>(), scale.data_ptr<float>(), h.stride(0), h.stride(1),
            y.stride(0), y.stride(1), gate.stride(0), shift.stride(0), scale.stride(0),
            h_new.data_ptr<float>(), out.data_ptr<float>(), h.size(1), h.size(2),
            static_cast<float>(eps)};
  run_rows(a, h.size(0) * h.size(1), true);
  return {h_new, out};
}

// ---------------------------------------------------------------------------------------------
// gelu_tanh
// ---------------------------------------------------------------------------------------------

// tanh-GELU: 0.5 * v * (1 + tanh(u)), u = sqrt(2/pi) * (v + 0.044715 v^3), torch's op order for u.
// 1 + tanh(u) = 2 / (1 + exp(-2u)) has no cancellation. torch rounds tanh(u) to float before
// adding 1; (s - 1) is that same rounding, so the two agree where it dominates (u << 0).
// exp(a), branch-free: a = n*ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 split so n*kLn2Hi is exact),
// then a degree-7 Taylor polynomial (truncation below 1e-8 relative) scaled by 2^n built in the
// exponent bits. a is clamped to [-87, 88] so 2^n stays a normal float; both ends only feed
// 2 / (1 + e), where they round to the limit anyway.
// Written on W-float vectors (the auto-vectorized scalar loop was latency-bound on AVX2: 1.37 ns per
// float; this form 0.92, bench/RESULTS.md); a span's tail runs the same code on a padded copy, so
// every element gets the same ops, lane-wise.
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
template <int W> using I = std::conditional_t<W == 16, i32x16, i32x8>;

// K vectors at once, each statement over all K: the GELU is one long dependent chain (~45 ops) per
// vector, and interleaving K independent chains in program order lets the core overlap them
// without looking far ahead (latency-bound otherwise: ~4 cycles per float on AVX2).
constexpr int kGeluK = 4;
#define DGFAST_EACH for (int k = 0; k < kGeluK; ++k)

template <int W> DGFAST_INLINE void gelu_v(V<W> (&v)[kGeluK]) {
  constexpr float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa = 0.044715f;
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f,
                  kLn2Lo = static_cast<float>(0.69314718055994531 - 0.693359375),
                  kRound = 12582912.0f;  // 1.5 * 2^23: (v + kRound) - kRound rounds v to an integer
  V<W> a[kGeluK], nf[kGeluK], r[kGeluK], p[kGeluK];
  DGFAST_EACH a[k] = -2.0f * (kBeta * (v[k] + kKappa * (v[k] * v[k] * v[k])));
  // exp(a)
  DGFAST_EACH a[k] = a[k] < -87.0f ? V<W>{} - 87.0f : (a[k] > 88.0f ? V<W>{} + 88.0f : a[k]);
  DGFAST_EACH nf[k] = (a[k] * kLog2e + kRound) - kRound;
  DGFAST_EACH r[k] = (a[k] - nf[k] * kLn2Hi) - nf[k] * kLn2Lo;
  DGFAST_EACH p[k] = V<W>{} + 1.0f / 5040.0f;
  DGFAST_EACH p[k] = p[k] * r[k] + 1.0f / 720.0f;
  DGFAST_EACH p[k] = p[k] * r[k] + 1.0f / 120.0f;
  DGFAST_EACH p[k] = p[k] * r[k] + 1.0f / 24.0f;
  DGFAST_EACH p[k] = p[k] * r[k] + 1.0f / 6.0f;
  DGFAST_EACH p[k] = p[k] * r[k] + 0.5f;
  DGFAST_EACH p[k] = p[k] * r[k] + 1.0f;
  DGFAST_EACH p[k] = p[k] * r[k] + 1.0f;
  DGFAST_EACH {
    const I<W> bits = (__builtin_convertvector(nf[k], I<W>) + 127) << 23;
    p[k] = p[k] * reinterpret_cast<const V<W>&>(bits);
  }
  // s = 2 / (1 + exp(-2u)), 0.5 v (1 + (s - 1))
  DGFAST_EACH p[k] = 2.0f / (1.0f + p[k]);
  DGFAST_EACH v[k] = 0.5f * v[k] * (1.0f + (p[k] - 1.0f));
}
#undef DGFAST_EACH

template <int W> DGFAST_INLINE void gelu_span_w(const float* x, const float* b, float* y, int64_t len) {
  constexpr int64_t step = W * kGeluK;
  int64_t j = 0;
  V<W> v[kGeluK];
  for (; j + step <= len; j += step) {  // x + bias rounded first, as torch
    for (int k = 0; k < kGeluK; ++k)
      v[k] = b != nullptr ? vload<W>(x + j + k * W) + vload<W>(b + j + k * W) : vload<W>(x + j + k * W);
    gelu_v<W>(v);
    for (int k = 0; k < kGeluK; ++k) vstore<W>(y + j + k * W, v[k]);
  }
  if (j < len) {  // the tail, zero-padded to one step (gelu(0) = 0)
    float pad[step] = {};
    const int64_t rest = len - j;
    for (int64_t i = 0; i < rest; ++i) pad[i] = b != nullptr ? x[j + i] + b[j + i] : x[j + i];
    for (int k = 0; k < kGeluK; ++k) v[k] = vload<W>(pad + k * W);
    gelu_v<W>(v);
    for (int k = 0; k < kGeluK; ++k) vstore<W>(pad + k * W, v[k]);
    std::copy(pad, pad + rest, y + j);
  }
}

#if DGFAST_X86
__attribute__((target("avx512f"))) void gelu_avx512(const float* x, const float* b, float* y, int64_t len) {
  gelu_span_w<16>(x, b, y, len);
}
__attribute__((target("avx2"))) void gelu_avx2(const float* x, const float* b, float* y, int64_t len) {
  gelu_span_w<8>(x, b, y, len);
}
#endif
void gelu_base(const float* x, const float* b, float* y, int64_t len) { gelu_span_w<8>(x, b, y, len); }

using GeluFn = void (*)(const float*, const float*, float*, int64_t);

GeluFn gelu_impl() {
  switch (cpu_isa()) {
#if DGFAST_X86
    case kAvx512: return gelu_avx512;
    case kAvx2: return gelu_avx2;
#endif
    default: return gelu_base;
  }
}

// bias: (D,) over the last dim. out: a contiguous tensor of x's shape, x itself included
// (elementwise, so in place is safe: a GEMM output dead after its GELU), or None for a new one.
at::Tensor gelu_tanh(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                     const std::optional<at::Tensor>& out_in) {
  const char* op = "gelu_tanh";
  check_f32(x_in, op, "x");
  const at::Tensor x = x_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) {
    check_f32(*bias_in, op, "bias");
    TORCH_CHECK(x.dim() >= 1 && bias_in->dim() == 1 && bias_in->size(0) == x.size(-1), op,
                ": bias must be (D,) with D = x.shape[-1] = ", x.dim() ? x.size(-1) : 0, ", got ",
                bias_in->sizes());
    bias = bias_in->contiguous();
  }
  at::Tensor out;
  if (out_in.has_value()) {
    out = *out_in;
    check_f32(out, op, "out");
    TORCH_CHECK(out.sizes() == x_in.sizes() && out.is_contiguous(), op, ": out must be a contiguous tensor of x's shape ",
                x_in.sizes(), ", got ", out.sizes());
  } else {
    out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const int64_t total = x.numel();
  if (total == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  const int64_t D = bias.defined() ? x.size(-1) : total;  // spans never cross a bias row
  const GeluFn gelu_span = gelu_impl();
  at::parallel_for(0, total, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end;) {
      const int64_t off = idx % D, len = std::min(end - idx, D - off);
      gelu_span(xp + idx, bp ? bp + off : nullptr, yp + idx, len);
      idx += len;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// weights_digest: the pair cache's exact check (dgfast/pair_cache.py, twin: _digest_torch)
// ---------------------------------------------------------------------------------------------
// Per tensor, its bytes read as little-endian 32-bit words w_i (a last partial word zero-padded)
// and two sums modulo 2^32: of fmix32(w_i ^ k_i) and of fmix32(w_i + k_i), k_i = i * 0x9E3779B9.
// fmix32 (MurmurHash3's finalizer) is a bijection, so one changed word always changes both sums;
// it is also nonlinear, so edits that move every word by the same amount (a tensor scaled by 2
// adds 2^23 to each float's bits, a sign flip 2^31) do not cancel the way a linear hash's terms
// would. Sums modulo 2^32 have no order: the result is the same for any thread count or vector
// width. One read of each value (4 bytes) instead of the torch formulation's ~12: memory-bound.

constexpr uint32_t kDigestKey = 0x9E3779B9u;

DGFAST_INLINE uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// n words from p (any alignment), word j being word i0 + j of its tensor; added into s[0], s[1].
DGFAST_INLINE void digest_words(const uint8_t* p, int64_t n, int64_t i0, uint32_t* s) {
  uint32_t a = 0, b = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t w;
    std::memcpy(&w, p + 4 * j, 4);
    const uint32_t k = static_cast<uint32_t>(i0 + j) * kDigestKey;
    a += fmix32(w ^ k);
    b += fmix32(w + k);
  }
  s[0] += a;
  s[1] += b;
}

#if DGFAST_X86
__attribute__((target("avx512f"))) void digest_avx512(const uint8_t* p, int64_t n, int64_t i0, uint32_t* s) {
  digest_words(p, n, i0, s);
}
__attribute__((target("avx2"))) void digest_avx2(const uint8_t* p, int64_t n, int64_t i0, uint32_t* s) {
  digest_words(p, n, i0, s);
}
#endif
void digest_base(const uint8_t* p, int64_t n, int64_t i0, uint32_t* s) { digest_words(p, n, i0, s); }

using DigestFn = void (*)(const uint8_t*, int64_t, int64_t, uint32_t*);

DigestFn digest_impl() {
  switch (cpu_isa()) {
#if DGFAST_X86
    case kAvx512: return digest_avx512;
    case kAvx2: return digest_avx2;
#endif
    default: return digest_base;
  }
}

// One int64 per tensor: (sum2 << 32) | sum1 as the bits of an int64. One call for all of a
// model pair's tensors (a few hundred): no per-tensor dispatch.
at::Tensor weights_digest(const std::vector<at::Tensor>& tensors) {
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::kLong);
  int64_t* res = out.data_ptr<int64_t>();
  const DigestFn fn = digest_impl();
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "weights_digest: tensor ", j,
                " must be a contiguous CPU tensor");
    const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size()), words = bytes / 4;
    std::atomic<uint32_t> s1{0}, s2{0};
    at::parallel_for(0, words, 1 << 16, [&](int64_t i0, int64_t i1) {
      uint32_t s[2] = {0, 0};
      fn(p + 4 * i0, i1 - i0, i0, s);
      s1.fetch_add(s[0], std::memory_order_relaxed);
      s2.fetch_add(s[1], std::memory_order_relaxed);
    });
    uint32_t s[2] = {s1.load(), s2.load()};
    if (bytes % 4) {  // the last partial word, zero-padded
      uint8_t tail[4] = {0, 0, 0, 0};
      std::memcpy(tail, p + 4 * words, bytes % 4);
      digest_words(tail, 1, words, s);
    }
    const uint64_t v = (static_cast<uint64_t>(s[1]) << 32) | s[0];
    std::memcpy(res + j, &v, 8);
  }
  return out;
}

std::string exp_backend() {
  return exp_impl() == exp_mkl ? "mkl-vml" : "at::exp";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dgfast fused CPU ops (float32); the torch twins live in dgfast/ops.py";
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("guided_step", &guided_step, nogil,
        "Guidance combination + DDPM/DDIM update, bit-equal to ops.guided_step_torch", arg("x"),
        arg("out_ft"), arg("out_guide"), arg("noise"), arg("coefs"), arg("scale"), arg("k"),
        arg("is_ddim"), arg("clip"));
  m.def("guided_step_modes", &guided_step_modes, nogil,
        "Guidance combination + linear / flow_euler / flow_heun update ([out] or [out, state]), "
        "bit-equal to ops.guided_step_torch",
        arg("x"), arg("out_ft"), arg("out_guide"), arg("noise"), arg("prev"), arg("coefs"),
        arg("scale"), arg("k"), arg("step_mode"), arg("clip"), arg("return_state"));
  // The modes this build implements: dgfast.ops runs a mode here only if it is listed (older builds:
  // ddpm/ddim only; modes added to dgfast.ops.SAMPLER_MODES later run the twin until built here).
  m.attr("GUIDED_STEP_MODES") = py::make_tuple("ddpm", "ddim", "linear", "flow_euler", "flow_heun");
  m.def("adaln_modulate", &adaln_modulate, nogil, "LayerNorm(h) * (1 + scale) + shift", arg("h"),
        arg("shift"), arg("scale"), arg("eps"));
  m.def("gated_residual_modulate", &gated_residual_modulate, nogil,
        "(h + gate*y, adaln_modulate(h + gate*y, shift, scale))", arg("h"), arg("gate"), arg("y"),
        arg("shift"), arg("scale"), arg("eps"));
  m.def("gelu_tanh", &gelu_tanh, nogil, "tanh-approximate GELU of x (+ bias), into out (x itself allowed)",
        arg("x"), arg("bias") = py::none(), arg("out") = py::none());
  m.def("weights_digest", &weights_digest, nogil,
        "two 32-bit hash sums per contiguous CPU tensor, as one int64 each (dgfast.pair_cache)",
        arg("tensors"));
  m.def("exp_backend", &exp_backend, "which exp guided_step uses to match torch.exp's bits");
  m.def("cpu_isa", [] { return std::string(kIsaNames[cpu_isa()]); },
        "the ISA the row and GELU kernels run (base, avx2 or avx512f)");
  m.def("set_cpu_isa", &set_cpu_isa, "run the row and GELU kernels with this ISA ('best', or one the "
        "CPU supports); returns the previous one", arg("name"));
}
