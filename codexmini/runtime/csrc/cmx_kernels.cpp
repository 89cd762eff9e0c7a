// codexmini's own CPU kernels for the on-device runtime, compiled on first use by torch.utils.cpp_extension.
//
// They read the portable .cmx layout directly (no repacking, so the weights in memory are the file's; see
// codexmini.ops.layouts), with scales as float16 (the layout's) or float32 (older files), both read in place:
//   int8:        qweight [N, K] int8, scale [N];                 w[n, k] = q * scale[n]
//   int4 / 3 / 2: qweight [N, K*bits/8] u8, scale [N, K/G], zero [N, K/G] u8 (asymmetric) or an empty tensor
//                (symmetric: the implied middle code 2^(bits-1));  w[n, k] = (code - zero) * scale  per group of G;
//                or, in the zero's place, min [N, K/G] float16 (the `_min` schemes): w[n, k] = code * scale + min
//     int4: column 2j in the low nibble of byte j, 2j+1 in the high one; int2: column 4j+k in bits 2k..2k+1 of byte
//     j; int3: the low two bits of every column as int2 (K/4 bytes), then the high bits (K/8 bytes, column 8j+k in
//     bit k of byte j), the two planes side by side in each row.
// and compute y = x W^T (+ residual). The calls (x: contiguous float32 [M, K]; residual: None or float32 [M, N]):
//   q8_linear(x, qweight, scale, residual=None, int8_act=False)
//   q4_linear / q3_linear / q2_linear(x, qweight, scale, zero, residual=None, int8_act=False)
//   q8_linear_cat(x, qweights, scales, int8_act=False, silu=False)
//   q4_linear_cat / q3_linear_cat / q2_linear_cat(x, qweights, scales, zeros, int8_act=False, silu=False)
// the _cat ones for several weights that read the same x, their outputs side by side ([M, sum N]), or with silu
// two (gate, up) of equal N giving silu(x G^T) * (x U^T) [M, N].
//
// One to eight rows (decoding) take a SIMD GEMV that reads each weight row once for all of them (AVX-512 or AVX2,
// chosen at compile time, or plain C++): with fp32 activations the result equals the dequantized reference up to
// the order of fp32 additions; with int8 activations (the fast path, `int8_act`, where K is a multiple of 32) it
// equals int8-rounded activations (per 32 columns) times the dequantized weight. More rows (prompts) dequantize a
// tile of rows at a time and multiply with at::mm: in fp32, or with the fast activations in bf16 where the CPU
// multiplies bf16 natively (equal to bf16-rounded activations and weights, each tile's product rounded to bf16).
//
// The references these are tested against are in tests/runtime/test_cmx_kernels.py and test_cmx_lowbit.py (the
// dequantization of codexmini.ops.layouts, and `int8_activations` there).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <string>
#include <type_traits>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#if defined(__AVX512VNNI__)
const char* kIsa = "avx512-vnni";  // the int8-activation dot products use vpdpbusd
#else
const char* kIsa = "avx512";
#endif
#elif defined(__AVX2__) && defined(__FMA__)
const char* kIsa = "avx2";
#else
const char* kIsa = "generic";
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 acc) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
#endif

constexpr int64_t kRowGrain = 16;    // output rows per parallel task, at least
constexpr int64_t kTaskBytes = 1 << 15;  // and at least this many weight bytes: smaller matrices stay on one thread

int64_t grain(int64_t row_bytes) { return std::max<int64_t>(kRowGrain, kTaskBytes / std::max<int64_t>(row_bytes, 1)); }
constexpr int64_t kTileRows = 256;   // rows dequantized at a time for multi-row inputs
// The GEMVs compute up to this many rows of x (one per sequence of a decoding batch) in one pass over each weight
// row: one kernel instance per row count.
constexpr int64_t kGemvRows = 8;
// Inputs of up to this many rows take the GEMVs, kGemvRows rows at a time, every chunk of rows over a block of
// kBlockRows weight rows while that block is in cache; longer ones (prompts) the tiled GEMM. On a 2-core AVX-512
// VNNI Xeon the chunked GEMVs with int8 activations cost 12-28 us per row of SmolLM2's matrices at 16-32 rows
// against 25-100 for the tiled GEMM (which dequantizes every weight tile whatever the rows); near 64 rows they are
// level. A row is computed exactly as it is alone, in any chunk. The runtime reads it (`gemv_rows()`) to cut a
// bigger decoding batch into calls of this many rows.
constexpr int64_t kDecodeRows = 32;
constexpr int64_t kBlockRows = 64;
// The GEMVs read each weight once, front to back: they ask for the bytes this far ahead as they go. The hardware
// prefetchers stop at every 4 KiB page of the mapped file and start over; measured on a 2-core AMD EPYC (every
// int4 matrix of a 20-layer model of SmolLM2's width in turn, alternating builds): one row 9% and eight rows 15%
// faster than without.
constexpr int64_t kPrefetchBytes = 4096;

// The mask of a vector of 16 lanes' first n (none for n <= 0, all for n >= 16): the tails of masked loads and stores.
inline uint16_t lanes16(int64_t n) { return static_cast<uint16_t>(n >= 16 ? 0xFFFF : n > 0 ? (1u << n) - 1 : 0); }

// f(std::integral_constant<int, M>{}) for M = rows, 1 .. kGemvRows: the GEMVs' one kernel instance per row count.
template <class F>
void with_rows(int64_t rows, F&& f) {
  static_assert(kGemvRows == 8, "one case per row count");
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

void check_input(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              what, ": input must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == K, what, ": input has ", x.size(1), " columns, the weight expects ", K);
}

void check_residual(const c10::optional<at::Tensor>& residual, int64_t M, int64_t N) {
  if (residual) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->dim() == 2 &&
                residual->size(0) == M && residual->size(1) == N, "residual must be a contiguous float32 [M, N]");
  }
}

at::Tensor new_output(const c10::optional<at::Tensor>& residual, int64_t M, int64_t N) {
  return residual ? residual->clone() : at::zeros({M, N}, at::kFloat);
}

// A weight of N rows that writes its rows a..b-1 as fp32 (K per row) into `out`.
struct DequantRows {
  int64_t N;
  std::function<void(int64_t, int64_t, float*)> rows;
};

inline float silu_times(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// e^x for x <= 0 (softmax's shifted scores), 16 lanes: 2^n (scalef) times e^g, g = x - n ln 2 in [-0.35, 0.35],
// by its Taylor series to degree 7 (truncation below 1e-8; with fp32 rounding about 1e-7 relative, as std::exp's
// reference allows). Scores below -100 (e^-100 is below fp32's normal range anyway) count as -100, so that -inf
// gives 0; a NaN stays NaN (max_ps returns its second operand when either is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-100.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 g = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// o = silu(g) * u over n values: the MLP's activation, after every gate/up product (prompts and decoding alike).
// 16 lanes at a time where the CPU has AVX-512: sigmoid(g) = 1 / (1 + e^-g) for g >= 0 and e^g / (1 + e^g) below,
// so that exp16 only sees -|g| <= 0 (no overflow for large |g|); silu_times, the scalar reference, takes the rest.
// A scalar std::exp per value cost about 2.5 ns: a third of a prompt's gate/up time and 8% of a batched decode step.
inline void silu_times_n(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
    const __m512 sig = _mm512_div_ps(num, _mm512_add_ps(one, e));
    _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = silu_times(g[i], u[i]);
}

// Whether this build's CPU multiplies bf16 natively (AVX-512 BF16, AMX or Arm BF16). Where it does, the fast
// activations may run prompts' matmuls in bf16: the runtime measures once whether torch's bf16 matmul beats its fp32
// one here (it did, by 1.3-1.6x on whole prompts, on an AMD EPYC with AVX-512 BF16; on a Xeon with AVX-512 BF16 but no
// AMX it ran at 0.4-0.75x) and sets `g_bf16_prompts` through set_bf16_prompts (native.load).
#if defined(__AVX512BF16__) || defined(__AMX_BF16__) || defined(__ARM_FEATURE_BF16)
constexpr bool kBf16Native = true;
#else
constexpr bool kBf16Native = false;
#endif
bool g_bf16_prompts = false;

// x [M, K] times one or more weights that read it, on MKL / oneDNN, dequantizing kTileRows rows of a weight at a
// time (a prompt's matmul costs one dequantization of each weight). A prompt's temporaries are what bound the
// runtime's peak memory, so nothing is allocated per tile and nothing is concatenated:
// - silu == false: the weights' outputs side by side, y [M, sum N] (+ residual), each tile's product written (or
//   added, with a residual) in place into its columns of y;
// - silu == true: two weights of equal N (gate, up) give silu(x G^T) * (x U^T) [M, N] (the [M, 2N] product is
//   never materialised; the reference is silu_mul of the concatenated outputs).
// bf16: x and the dequantized tiles are rounded to bf16 and each tile's product comes out in bf16 (accumulated in
// fp32 inside the GEMM), then is widened into the fp32 output; otherwise everything is fp32, exactly.
at::Tensor tiled_gemm(const at::Tensor& x, int64_t K, const std::vector<DequantRows>& parts,
                      const c10::optional<at::Tensor>& residual, bool silu, bool bf16) {
  const int64_t M = x.size(0);
  int64_t total = 0, rows = 1;
  for (const auto& p : parts) {
    total += p.N;
    rows = std::max(rows, std::min(kTileRows, p.N));
  }
  const int64_t ntiles = silu ? 2 : 1;
  at::Tensor tile = at::empty({ntiles * rows, K}, at::kFloat);
  float* t = tile.data_ptr<float>();
  // bf16: the activations once, the tiles and their products in reused buffers
  const at::Tensor xb = bf16 ? x.to(at::kBFloat16) : x;
  at::Tensor tile_b = bf16 ? at::empty({ntiles * rows, K}, at::kBFloat16) : tile;
  at::Tensor prod_b = bf16 ? at::empty({ntiles, M * rows}, at::kBFloat16) : at::Tensor();
  auto dequant = [&](const DequantRows& p, int64_t n0, int64_t n1, float* out) {
    at::parallel_for(n0, n1, kRowGrain, [&](int64_t a, int64_t b) { p.rows(a, b, out + (a - n0) * K); });
  };
  // the tile's weight rows [first, first + nt) as the GEMM's right-hand side, in the GEMM's dtype
  auto rhs = [&](int64_t first, int64_t nt) {
    if (bf16) tile_b.narrow(0, first, nt).copy_(tile.narrow(0, first, nt));
    return tile_b.narrow(0, first, nt).t();
  };
  if (silu) {
    TORCH_CHECK(parts.size() == 2 && parts[0].N == parts[1].N, "silu: two weights (gate, up) of equal rows");
    const int64_t N = parts[0].N;
    at::Tensor y = at::empty({M, N}, at::kFloat);
    at::Tensor gu = at::empty({2, M * rows}, at::kFloat);
    float* yp = y.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(n0 + kTileRows, N), nt = n1 - n0;
      dequant(parts[0], n0, n1, t);
      dequant(parts[1], n0, n1, t + rows * K);
      at::Tensor g = gu[0].narrow(0, 0, M * nt).view({M, nt}), u = gu[1].narrow(0, 0, M * nt).view({M, nt});
      if (bf16) {
        at::Tensor gb = prod_b[0].narrow(0, 0, M * nt).view({M, nt}), ub = prod_b[1].narrow(0, 0, M * nt).view({M, nt});
        at::mm_out(gb, xb, rhs(0, nt));
        at::mm_out(ub, xb, rhs(rows, nt));
        g.copy_(gb);
        u.copy_(ub);
      } else {
        at::mm_out(g, x, rhs(0, nt));
        at::mm_out(u, x, rhs(rows, nt));
      }
      const float* gp = g.data_ptr<float>();
      const float* up = u.data_ptr<float>();
      at::parallel_for(0, M, 16, [&](int64_t a, int64_t b) {
        for (int64_t m = a; m < b; ++m)
          silu_times_n(gp + m * nt, up + m * nt, yp + m * N + n0, nt);
      });
    }
    return y;
  }
  at::Tensor y = residual ? residual->clone() : at::empty({M, total}, at::kFloat);
  int64_t col = 0;
  for (const auto& p : parts) {
    for (int64_t n0 = 0; n0 < p.N; n0 += kTileRows) {
      const int64_t n1 = std::min(n0 + kTileRows, p.N), nt = n1 - n0;
      dequant(p, n0, n1, t);
      at::Tensor out = y.narrow(1, col + n0, nt);  // a strided view: BLAS writes it with its row stride
      if (bf16) {
        at::Tensor pb = prod_b[0].narrow(0, 0, M * nt).view({M, nt});
        at::mm_out(pb, xb, rhs(0, nt));
        if (residual) out.add_(pb);
        else out.copy_(pb);
      } else if (residual) {
        at::addmm_out(out, out, x, rhs(0, nt));
      } else {
        at::mm_out(out, x, rhs(0, nt));
      }
    }
    col += p.N;
  }
  return y;
}

// ------------------------------------------------------------------------------------------------ scales
// Scales as stored: float16 (the portable layout's) or float32 (.cmx files of version 2 and older), read in place.
struct Scales {
  const void* p = nullptr;
  bool half = false;
  float operator[](int64_t i) const {
    return half ? static_cast<float>(static_cast<const c10::Half*>(p)[i]) : static_cast<const float*>(p)[i];
  }
  const void* at(int64_t i) const {
    return half ? static_cast<const void*>(static_cast<const c10::Half*>(p) + i)
                : static_cast<const void*>(static_cast<const float*>(p) + i);
  }
};

bool is_scale_dtype(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf; }
Scales scales_of(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type() == at::kHalf}; }

// ------------------------------------------------------------------------------------------------ int8 activations
// The fast decoding path (llama.cpp's approach): an activation row is quantized to int8 per block of 32 columns
// (x ~= xq * dx, round to nearest even, |xq| <= 127), so that its dot products with integer codes are exact integer
// arithmetic (AVX-512 VNNI `vpdpbusd`, or AVX2 `maddubs` + `madd`). The reference is `int8_activations` in
// tests/runtime/test_cmx_kernels.py: the kernels equal those activations times the dequantized weight.
struct QuantRow {
  std::vector<int8_t> xq;  // [K]
  std::vector<float> dx;   // [K / 32] block scales
};

QuantRow quantize_row(const float* x, int64_t K) {
  QuantRow q{std::vector<int8_t>(K), std::vector<float>(K / 32)};
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    int8_t* out = q.xq.data() + b * 32;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // (the rounding of the conversion is the MXCSR's, round to nearest even, as nearbyint's)
    const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 s = _mm512_set1_ps(inv);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, s))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, s))));
#else
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int j = 0; j < 32; ++j) out[j] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
#endif
    q.dx[b] = amax / 127.f;
  }
  return q;
}

// ------------------------------------------------------------------------------------------------ int4 / int3 / int2
// Group-quantized weights in the portable layout (codexmini.ops.layouts): w = (code - zero) * scale per group of G
// columns, the zero point stored (asymmetric) or the implied middle code 2^(bits-1) (symmetric: `zero` is empty);
// or w = code * scale + min (the `_min` schemes: a float16 tensor in the zero's place).
//
// Decoding (one to eight rows of x) is a GEMV that reads each weight row once for all rows of x. A row is cut into
// chunks of C = V * W columns (V: fp32 lanes of the SIMD registers, 16 with AVX-512, 8 with AVX2; W: columns per
// lane, 8 for int4 and 16 for int3 / int2) such that SIMD lane l of a chunk sums the products of its columns
// W l .. W l + W-1 only. Each lane then lies in one group (G a multiple of W): its sum is scaled, with int8
// activations, by its 32-column block's dx, then by its group's scale (a permute of the row's scales: AVX-512
// converts them to fp32 once per row, into windows of 16 groups). The activations are reordered once per call to the
// order in which the codes come out of the packed bytes, by shifts and masks (GFNI bit-matrix products where the
// CPU has them), without shuffles:
// - int8 activations, "steps": step k < W/4 of a chunk is 4V bytes, byte p the code of column (W/4) p + k (int4: the
//   low then the high nibbles of the chunk's 4V bytes; int2: the 2-bit fields k of its 4V bytes; int3: those of its
//   low plane, with the high bits of the same columns from its 2V high-plane bytes), so that the 4 bytes of int32
//   lane l, over the steps, are exactly columns W l .. W l + W-1 (`vpdpbusd` sums 4 bytes per lane);
// - fp32 activations, "lanes": lane code s < W of a chunk holds, in int32 lane l, the code of column W l + s (the
//   field s of the lane's 4 bytes), converted to fp32 and multiplied with the matching activations by FMA.
// The zero points' share, sum_g scale_g * zero_g * (sum of x over group g), is folded into the lanes for a symmetric
// weight (-2^(bits-1) times each lane's activations, prepared once per call) and summed once per row for an
// asymmetric one (the mins', sum_g min_g * (sum of x over group g), likewise). A row's last, partial chunk (K = 576: 64 columns) would cost a whole chunk: where its lanes divide
// V, the tails of several rows share one chunk instead ("tail blocks").
// Group sizes that are not a multiple of W (int3 / int2 g8, odd int4 ones) and CPUs without AVX2 take the plain C++
// loops, which compute the same sums column by column. Prompts dequantize tiles of rows for tiled_gemm.
struct GroupWeight {
  int64_t N, K, G, ng;  // ng = K / G groups per row
  int bits;
  const uint8_t* w;     // [N, K * bits / 8]
  Scales scale;         // [N, ng]
  const uint8_t* zero;  // [N, ng], or nullptr: symmetric, the implied zero point 2^(bits-1)
  const c10::Half* mn;  // [N, ng] the `_min` schemes' offsets (then zero is nullptr), or nullptr
  // whether the weight has per-group offsets of its own (zero points or mins), summed once per row
  bool offsets() const { return zero || mn; }
  int64_t row_bytes() const { return K * bits / 8; }
  int64_t groups() const { return ng; }
  float zero_at(int64_t i) const { return zero ? static_cast<float>(zero[i]) : static_cast<float>(1 << (bits - 1)); }
  DequantRows dequant() const;
};

GroupWeight group_weight(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero, int bits) {
  const std::string name = "int" + std::to_string(bits);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              name, " qweight must be a contiguous uint8 [N, K*", bits, "/8]");
  TORCH_CHECK(bits != 3 || qweight.size(1) % 3 == 0, "int3 qweight rows hold a multiple of 3 bytes (a low plane of "
              "K/4 and a high plane of K/8), got ", qweight.size(1));
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8 / bits;
  TORCH_CHECK(is_scale_dtype(scale) && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N &&
              scale.size(1) > 0, name, " scale must be a contiguous float32 or float16 [N, K/G]");
  const bool mins = zero.numel() && zero.scalar_type() == at::kHalf;
  TORCH_CHECK(zero.numel() == 0 || ((zero.scalar_type() == at::kByte || mins) && zero.is_contiguous() &&
                                    zero.sizes() == scale.sizes()),
              name, " zero must be a contiguous uint8 tensor shaped like scale (zero points), a float16 one (mins), "
              "or empty (symmetric)");
  const int64_t G = K / scale.size(1), step = bits == 4 ? 2 : 8;
  TORCH_CHECK(G * scale.size(1) == K && G % step == 0, name, " group size ", G, " must divide K=", K,
              " and be a multiple of ", step);
  return {N, K, G, scale.size(1), bits, qweight.data_ptr<uint8_t>(), scales_of(scale),
          zero.numel() && !mins ? zero.data_ptr<uint8_t>() : nullptr,
          mins ? zero.data_ptr<c10::Half>() : nullptr};
}

// The code of column e of a packed row (int4: two per byte, low nibble first; int2: four per byte, from bit 0 up;
// int3: an int2 plane of the low two bits, then a plane of the high bits, eight per byte).
inline int code_at(const uint8_t* row, int64_t K, int bits, int64_t e) {
  if (bits == 4) return (row[e >> 1] >> ((e & 1) * 4)) & 0x0F;
  const int low = (row[e >> 2] >> ((e & 3) * 2)) & 0x03;
  if (bits == 2) return low;
  return low | (((row[K / 4 + (e >> 3)] >> (e & 7)) & 1) << 2);
}

// A zero-filled buffer of n values at a 64-byte aligned address, so that the vector loads from it at multiples of
// 64 bytes never split a cache line.
template <class T>
T* buffer(std::vector<uint8_t>& hold, int64_t n) {
  hold.assign(n * sizeof(T) + 64, 0);
  const uintptr_t p = reinterpret_cast<uintptr_t>(hold.data());
  return reinterpret_cast<T*>((p + 63) / 64 * 64);
}

// The activations of one GEMV call (one to eight rows of x), prepared once in the forms the row kernels read.
struct Acts {
  int64_t M = 0, K = 0, G = 0;
  bool q8 = false, simd = false;
  std::vector<const float*> x;  // the rows as given
  std::vector<QuantRow> q;      // int8 activations (q8), natural order
  int64_t gstride = 0;          // per row of gsum: K/G, padded for vector loads
  float* gsum = nullptr;        // [M, gstride] the (int8-rounded with q8) activations summed per group
  // the SIMD kernels': activations in the chunks' order, per row of x `stride` columns (whole chunks, zero-padded)
  int64_t stride = 0, lanes = 0;
  int8_t* xq = nullptr;         // [M, stride] q8: in the steps' order
  float* xf = nullptr;          // [M, stride] fp32: in the lanes' order
  float* dx = nullptr;          // [M, lanes] q8: each lane's block scale
  float* zx = nullptr;          // [M, lanes] -2^(bits-1) * the lane's (dequantized) activations: a symmetric
                                // weight's zero points' share, folded into the lanes
  float* nozero = nullptr;      // [lanes] zeros: the same for an asymmetric weight (its zero points go by row)
  // Tail blocks: where a row's last, partial chunk has t lanes, t dividing V, the tails of B = V / t rows share one
  // chunk (lanes r t .. r t + t-1: row r's), with their activations repeated B times. B = 1: no tail blocks.
  int tail_rows = 1;
  int8_t* txq = nullptr;        // [M, C] q8: the tail chunk's steps, each row's part repeated
  float* txf = nullptr;         // [M, C] fp32: the same in the lanes' order
  float* tdx = nullptr;         // [M, V]
  float* tzx = nullptr;         // [M, V]
  int32_t* tidx = nullptr;      // [V] each lane's group, relative to the tail chunk's window / first group
  int32_t* g0 = nullptr;        // [chunks] each chunk's first group
  int32_t* idx = nullptr;       // [chunks, V] each lane's group, relative to its chunk's first (or its window's)
  std::vector<std::vector<uint8_t>> hold;  // the buffers' storage
  template <class T>
  T* alloc(int64_t n) {
    hold.emplace_back();
    return buffer<T>(hold.back(), n);
  }
};

// Plain C++: any group size the layout allows, column by column (the fallback, and the reference the SIMD kernels
// reorder).
void gemv_rows_plain(const GroupWeight& q, const Acts& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t K = q.K, G = q.G, ng = q.groups();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q.w + n * q.row_bytes();
    for (int64_t m = 0; m < a.M; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float dot = 0.f;
        if (a.q8) {  // exact integer sums within each 32-column block, scaled by its dx
          const QuantRow& r = a.q[m];
          for (int64_t e0 = g * G; e0 < (g + 1) * G;) {
            const int64_t e1 = std::min((g + 1) * G, (e0 / 32 + 1) * 32);
            int32_t d = 0;
            for (int64_t e = e0; e < e1; ++e) d += code_at(row, K, q.bits, e) * r.xq[e];
            dot += static_cast<float>(d) * r.dx[e0 / 32];
            e0 = e1;
          }
        } else {
          const float* x = a.x[m];
          for (int64_t e = g * G; e < (g + 1) * G; ++e) dot += static_cast<float>(code_at(row, K, q.bits, e)) * x[e];
        }
        const int64_t i = n * ng + g;
        const float gs = a.gsum[m * a.gstride + g];
        total += q.mn ? q.scale[i] * dot + static_cast<float>(q.mn[i]) * gs : q.scale[i] * (dot - q.zero_at(i) * gs);
      }
      y[m * ldy + n] += total;
    }
  }
}

template <int BITS>
void dequant_rows_plain(const GroupWeight& q, int64_t n, int64_t g, float* o) {
  const float s = q.scale[n * q.groups() + g], z = q.zero_at(n * q.groups() + g);
  const uint8_t* row = q.w + n * q.row_bytes();
  if (q.mn) {
    const float mn = static_cast<float>(q.mn[n * q.groups() + g]);
    for (int64_t e = g * q.G; e < (g + 1) * q.G; ++e) o[e] = static_cast<float>(code_at(row, q.K, BITS, e)) * s + mn;
    return;
  }
  for (int64_t e = g * q.G; e < (g + 1) * q.G; ++e) o[e] = (static_cast<float>(code_at(row, q.K, BITS, e)) - z) * s;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CMX_GROUP_SIMD 1
// AVX-512: 16 fp32 lanes; a chunk's step is 64 bytes.
struct Avx512 {
  static constexpr int V = 16;
  using F = __m512;
  using I = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static I izero() { return _mm512_setzero_si512(); }
  static F set(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I bytes(const void* p) { return _mm512_loadu_si512(p); }  // 4V bytes
  static I widen8(const uint8_t* p) {  // 2V bytes, one per 16-bit lane
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static I widen16(const uint8_t* p) {  // 2V bytes, two per 32-bit lane
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // the same from only n bytes (the last chunk of a row), the rest zero
  static I bytes_part(const void* p, int n) {
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~0ull : (1ull << n) - 1, p);
  }
  static I widen8_part(const uint8_t* p, int n) { return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(part32(n), p)); }
  static I widen16_part(const uint8_t* p, int n) {
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi8(part32(n), p));
  }
  static __mmask32 part32(int n) { return n >= 32 ? ~0u : (1u << n) - 1; }
  // the last n bytes of each of B rows' low planes side by side (B n = 4V), and of their int3 high planes (B n / 2
  // = 2V) widened as widen8 / widen16 do: each by a masked load into its bytes (nothing else is read)
  static I gather(const uint8_t* const* p, int B, int n) {
    I v = izero();
    for (int r = 0; r < B; ++r)
      v = _mm512_mask_loadu_epi8(v, ((n >= 64 ? ~0ull : (1ull << n) - 1)) << (r * n), p[r] - r * n);
    return v;
  }
  static __m256i gather_half(const uint8_t* const* p, int B, int n) {
    __m256i v = _mm256_setzero_si256();
    for (int r = 0; r < B; ++r) v = _mm256_mask_loadu_epi8(v, part32(n) << (r * n), p[r] - r * n);
    return v;
  }
  static I gather8(const uint8_t* const* p, int B, int n) { return _mm512_cvtepu8_epi16(gather_half(p, B, n)); }
  static I gather16(const uint8_t* const* p, int B, int n) { return _mm512_cvtepu16_epi32(gather_half(p, B, n)); }
  // lanes set in `bits` from b, the others from a (or zero)
  static F select(F a, F b, uint32_t bits) { return _mm512_mask_mov_ps(a, static_cast<__mmask16>(bits), b); }
  static F keep(F v, uint32_t bits) { return _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), v); }
  static I set8(int v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  static I set16(int v) { return _mm512_set1_epi16(static_cast<short>(v)); }
  static I set32(int v) { return _mm512_set1_epi32(v); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I srl16(I a, int n) { return _mm512_srli_epi16(a, n); }
  static I sll16(I a, int n) { return _mm512_slli_epi16(a, n); }
  static I srl32(I a, int n) { return _mm512_srli_epi32(a, n); }
  static I sll32(I a, int n) { return _mm512_slli_epi32(a, n); }
  static I dot(I acc, I u8, I s8) {  // acc + the sum of 4 products u8 * s8 per int32 lane
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u8, s8);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u8, s8), _mm512_set1_epi16(1)));
#endif
  }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // each lane's scale from a window of 16 groups' scales by lane indices 0..15 (a window spans 16 G columns, G / W
  // whole chunks: no chunk reaches into the next one)
  static constexpr bool kWindows = true;
  static F lanes(const float* w, const int32_t* idx) {
    return _mm512_permutexvar_ps(_mm512_loadu_si512(idx), _mm512_load_ps(w));
  }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
  // bits shift .. shift+width-1 of every byte, in its low bits; bit `from` of every byte, in bit `to`
#if defined(__GFNI__)
  static I field8(I b, int shift, int width) {  // one affine bit-matrix product per byte (row i: output bit i)
    uint64_t a = 0;
    for (int i = 0; i < width; ++i) a |= (uint64_t{1} << (shift + i)) << (8 * (7 - i));
    return _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64(static_cast<long long>(a)), 0);
  }
  static I bit8(I b, int from, int to) {
    const uint64_t a = (uint64_t{1} << from) << (8 * (7 - to));
    return _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64(static_cast<long long>(a)), 0);
  }
#else
  static I field8(I b, int shift, int width) { return and_(shift ? srl16(b, shift) : b, set8((1 << width) - 1)); }
  static I bit8(I b, int from, int to) {
    return and_(from >= to ? srl16(b, from - to) : sll16(b, to - from), set8(1 << to));
  }
#endif
  // n <= V scales / zero points from i (masked loads: nothing past them is read)
  static F scales(Scales s, int64_t i, int n) {
    const __mmask16 k = lanes16(n);
    if (s.half) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s.at(i)));
    return _mm512_maskz_loadu_ps(k, s.at(i));
  }
  static F zeros(const uint8_t* p, int n) {
    const __mmask16 k = lanes16(n);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p)));
  }
  // the codes of columns e0 .. e0 + V-1 (e0 a multiple of V) in natural order, for the prompts' dequantization
  template <int BITS>
  static I natural(const uint8_t* row, int64_t K, int64_t e0) {
    if constexpr (BITS == 4) {
      uint32_t lo, hi;
      std::memcpy(&lo, row + e0 / 2, 4);
      std::memcpy(&hi, row + e0 / 2 + 4, 4);
      const I v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(lo))),
                                     _mm256_set1_epi32(static_cast<int>(hi)), 1);
      return and_(_mm512_srlv_epi32(v, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
                  set32(0x0F));
    } else {
      uint32_t lo;
      std::memcpy(&lo, row + e0 / 4, 4);
      I c = and_(_mm512_srlv_epi32(set32(static_cast<int>(lo)),
                                   _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)),
                 set32(0x03));
      if constexpr (BITS == 3) {
        uint16_t hi;
        std::memcpy(&hi, row + K / 4 + e0 / 8, 2);
        const I h = _mm512_srlv_epi32(set32(hi), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        c = or_(c, sll32(and_(h, set32(1)), 2));
      }
      return c;
    }
  }
};
using Simd = Avx512;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CMX_GROUP_SIMD 1
// AVX2: 8 fp32 lanes; a chunk's step is 32 bytes.
struct Avx2 {
  static constexpr int V = 8;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static I izero() { return _mm256_setzero_si256(); }
  static F set(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static I bytes(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I widen8(const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I widen16(const uint8_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // the same from only n bytes (the last chunk of a row), the rest zero: by a copy (no byte-masked loads in AVX2)
  static I bytes_part(const void* p, int n) {
    alignas(32) uint8_t b[32] = {};
    std::memcpy(b, p, n);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
  }
  static I widen8_part(const uint8_t* p, int n) {
    alignas(16) uint8_t b[16] = {};
    std::memcpy(b, p, n);
    return widen8(b);
  }
  static I widen16_part(const uint8_t* p, int n) {
    alignas(16) uint8_t b[16] = {};
    std::memcpy(b, p, n);
    return widen16(b);
  }
  // the last n bytes of each of B rows side by side (see Avx512::gather), by a copy
  static I gather(const uint8_t* const* p, int B, int n) {
    alignas(32) uint8_t b[32] = {};
    for (int r = 0; r < B; ++r) std::memcpy(b + r * n, p[r], n);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
  }
  static I gather8(const uint8_t* const* p, int B, int n) {
    alignas(16) uint8_t b[16] = {};
    for (int r = 0; r < B; ++r) std::memcpy(b + r * n, p[r], n);
    return widen8(b);
  }
  static I gather16(const uint8_t* const* p, int B, int n) {
    alignas(16) uint8_t b[16] = {};
    for (int r = 0; r < B; ++r) std::memcpy(b + r * n, p[r], n);
    return widen16(b);
  }
  static F select(F a, F b, uint32_t bits) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane), lane);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(m));
  }
  static F keep(F v, uint32_t bits) { return select(zero(), v, bits); }
  static I set8(int v) { return _mm256_set1_epi8(static_cast<char>(v)); }
  static I set16(int v) { return _mm256_set1_epi16(static_cast<short>(v)); }
  static I set32(int v) { return _mm256_set1_epi32(v); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I srl16(I a, int n) { return _mm256_srli_epi16(a, n); }
  static I sll16(I a, int n) { return _mm256_slli_epi16(a, n); }
  static I srl32(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I sll32(I a, int n) { return _mm256_slli_epi32(a, n); }
  static I dot(I acc, I u8, I s8) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u8, s8);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u8, s8);
#else  // |products| <= 2 * 15 * 127 per pair: maddubs' int16 sums do not saturate
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), _mm256_set1_epi16(1)));
#endif
  }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  // each lane's scale from the V scales from the chunk's first group, by lane indices 0..V-1
  static constexpr bool kWindows = false;
  static F permute(F v, const int32_t* idx) {
    return _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)));
  }
  static float sum(F v) { return hsum(v); }
  static I field8(I b, int shift, int width) { return and_(shift ? srl16(b, shift) : b, set8((1 << width) - 1)); }
  static I bit8(I b, int from, int to) {
    return and_(from >= to ? srl16(b, from - to) : sll16(b, to - from), set8(1 << to));
  }
  static F scales(Scales s, int64_t i, int n) {  // no 16-bit masked loads in AVX2: a short tail goes by a copy
    if (n >= 8) {
      if (s.half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.at(i))));
      return _mm256_loadu_ps(static_cast<const float*>(s.at(i)));
    }
    if (s.half) {
      alignas(16) uint16_t b[8] = {};
      std::memcpy(b, s.at(i), 2 * n);
      return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
    alignas(32) float b[8] = {};
    std::memcpy(b, s.at(i), 4 * n);
    return _mm256_load_ps(b);
  }
  static F zeros(const uint8_t* p, int n) {
    uint64_t b = 0;
    std::memcpy(&b, p, std::min(n, 8));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(b))));
  }
  template <int BITS>
  static I natural(const uint8_t* row, int64_t K, int64_t e0) {
    if constexpr (BITS == 4) {
      uint32_t v;
      std::memcpy(&v, row + e0 / 2, 4);
      return and_(_mm256_srlv_epi32(set32(static_cast<int>(v)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                  set32(0x0F));
    } else {
      uint16_t lo;
      std::memcpy(&lo, row + e0 / 4, 2);
      I c = and_(_mm256_srlv_epi32(set32(lo), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), set32(0x03));
      if constexpr (BITS == 3) {
        const I h = _mm256_srlv_epi32(set32(row[K / 4 + e0 / 8]), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        c = or_(c, sll32(and_(h, set32(1)), 2));
      }
      return c;
    }
  }
};
using Simd = Avx2;
#else
#define CMX_GROUP_SIMD 0  // plain C++ only
#endif

#if CMX_GROUP_SIMD
constexpr int columns_per_lane(int bits) { return bits == 4 ? 8 : 16; }  // W

// A chunk's codes in the steps' order (int8 activations): step k, byte p = code of column (W/4) p + k.
template <class S, int BITS>
struct StepCodes;
// Constructed from the chunk's 4V (low-plane) bytes `b` and, for int3, its 2V high-plane bytes as loaded by
// `S::widen8` (steps) or `S::widen16` (lanes).
template <class S>
struct StepCodes<S, 4> {  // step 0: the low nibbles of the chunk's 4V bytes, step 1: the high ones
  typename S::I b;
  StepCodes(typename S::I lo, typename S::I) : b(lo) {}
  typename S::I operator()(int k) const { return S::field8(b, 4 * k, 4); }
};
template <class S>
struct StepCodes<S, 2> {  // step k: bits 2k, 2k+1 of every byte
  typename S::I b;
  StepCodes(typename S::I lo, typename S::I) : b(lo) {}
  typename S::I operator()(int k) const { return S::field8(b, 2 * k, 2); }
};
template <class S>
struct StepCodes<S, 3> {  // the low plane as int2, plus the high bit of the same columns in bit 2
  typename S::I b, h;     // h: byte p holds the high bits of columns 4p .. 4p+3 in its bits 0..3
  StepCodes(typename S::I lo, typename S::I w) : b(lo) {  // w: a high-plane byte per 16-bit lane
    h = S::and_(S::or_(w, S::sll16(w, 4)), S::set16(0x0F0F));  // its two nibbles into two bytes
  }
  typename S::I operator()(int k) const { return S::or_(S::field8(b, 2 * k, 2), S::bit8(h, k, 2)); }
};

// A chunk's codes in the lanes' order (fp32 activations): lane code s, int32 lane l = code of column W l + s.
template <class S, int BITS>
struct LaneCodes;
template <class S>
struct LaneCodes<S, 4> {
  typename S::I b;
  LaneCodes(typename S::I lo, typename S::I) : b(lo) {}
  typename S::I operator()(int s) const { return S::and_(S::srl32(b, 4 * s), S::set32(0x0F)); }
};
template <class S>
struct LaneCodes<S, 2> {
  typename S::I b;
  LaneCodes(typename S::I lo, typename S::I) : b(lo) {}
  typename S::I operator()(int s) const { return S::and_(S::srl32(b, 2 * s), S::set32(0x03)); }
};
template <class S>
struct LaneCodes<S, 3> {
  typename S::I b, h;  // h: lane l holds the high bits of its 16 columns in bits 2..17
  LaneCodes(typename S::I lo, typename S::I w) : b(lo), h(S::sll32(w, 2)) {}  // w: 2 high bytes per lane
  typename S::I operator()(int s) const {
    return S::or_(S::and_(S::srl32(b, 2 * s), S::set32(0x03)), S::and_(S::srl32(h, s), S::set32(0x04)));
  }
};

// Once per weight row: with windows (AVX-512), its scales as fp32 into windows of 16 groups, and for an asymmetric
// weight minus its zero points' share for each row of x as V partial sums, z[m] = -sum_g s_g z_g gsum[m][g] (a
// `_min` weight's: z[m] = sum_g min_g gsum[m][g]).
// (inlined: its results stay in registers)
template <class S, int M>
__attribute__((always_inline)) inline void row_pass(const GroupWeight& q, int64_t n, const float* const* gsum,
                                                    float* win, typename S::F* z) {
  constexpr int V = S::V;
  const int64_t ng = q.ng, base = n * ng;
  for (int m = 0; m < M; ++m) z[m] = S::zero();
  if (!S::kWindows && !q.offsets()) return;
  for (int64_t g = 0; g < ng; g += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, ng - g));
    const typename S::F s = S::scales(q.scale, base + g, cnt);
    if (S::kWindows) S::store(win + g, s);
    if (q.offsets()) {
      const typename S::F sz = q.mn ? S::scales(Scales{q.mn, true}, base + g, cnt)
                                    : S::mul(s, S::sub(S::zero(), S::zeros(q.zero + base + g, cnt)));
      for (int m = 0; m < M; ++m) z[m] = S::fma(sz, S::load(gsum[m] + g), z[m]);
    }
  }
}

template <class S, int BITS, int M, bool Q8>
void gemv_rows_simd(const GroupWeight& q, const Acts& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  using F = typename S::F;
  using I = typename S::I;
  constexpr int V = S::V, W = columns_per_lane(BITS), C = V * W;
  const int64_t K = q.K, rb = q.row_bytes(), full = K / C, tail = K % C, total = q.N * q.ng;
  const int tail_lo = static_cast<int>(tail * (BITS == 4 ? 4 : 2) / 8), tail_hi = static_cast<int>(tail / 8);
  const int B = a.tail_rows, tl = static_cast<int>(tail / W);
  const int32_t* g0 = a.g0;
  const int32_t* idx = a.idx;
  // the activations of a chunk: the rows' (chunk c at c C, c V) or a tail block's (c = 0)
  struct ChunkActs {
    const int8_t* xq[M];
    const float* xf[M];
    const float* dx[M];
    const float* zx[M];
  } rows, block;
  const float* gsum[M];
  for (int m = 0; m < M; ++m) {
    rows.xq[m] = Q8 ? a.xq + m * a.stride : nullptr;
    rows.xf[m] = Q8 ? nullptr : a.xf + m * a.stride;
    rows.dx[m] = Q8 ? a.dx + m * a.lanes : nullptr;
    rows.zx[m] = q.offsets() ? a.nozero : a.zx + m * a.lanes;
    block.xq[m] = Q8 && B > 1 ? a.txq + m * C : nullptr;
    block.xf[m] = !Q8 && B > 1 ? a.txf + m * C : nullptr;
    block.dx[m] = Q8 && B > 1 ? a.tdx + m * V : nullptr;
    block.zx[m] = B > 1 ? (q.offsets() ? a.nozero : a.tzx + m * V) : nullptr;
    gsum[m] = a.gsum + m * a.gstride;
  }
  // per row of a block: its scales in windows of 16 groups (AVX-512) and its zero points' share (asymmetric)
  const int64_t wstride = (q.ng + 15) / 16 * 16;
  std::vector<uint8_t> hold;
  float* wins = buffer<float>(hold, B * (wstride + M * V));
  float* zneg = wins + B * wstride;
  // each lane's scale in chunk c of the row whose windows are w and first scale `base`
  auto scales = [&](int64_t c, const float* w, int64_t base, const int32_t* lane_idx) __attribute__((always_inline)) {
    if constexpr (S::kWindows) {
      return S::lanes(w + g0[c], lane_idx);
    } else {  // the V scales from the chunk's first group (past this row's end: not selected; only the last rows
              // of the tensor need a partial load)
      const int64_t first = base + g0[c];
      return S::permute(S::scales(q.scale, first, static_cast<int>(std::min<int64_t>(V, total - first))), lane_idx);
    }
  };
  // acc[m] += chunk c's sums, from its low-plane bytes b and int3's high-plane bytes h (widened as the codes' order
  // needs) and its lanes' scales sv
  auto chunk = [&](const ChunkActs& x, int64_t c, I b, I h, F sv, F* acc) __attribute__((always_inline)) {
    if constexpr (Q8) {
      const StepCodes<S, BITS> codes(b, h);
      I isum[M];
      for (int m = 0; m < M; ++m) isum[m] = S::izero();
#pragma GCC unroll 4
      for (int k = 0; k < W / 4; ++k) {
        const I code = codes(k);
        for (int m = 0; m < M; ++m) isum[m] = S::dot(isum[m], code, S::bytes(x.xq[m] + c * C + k * 4 * V));
      }
      for (int m = 0; m < M; ++m)
        acc[m] = S::fma(S::fma(S::cvt(isum[m]), S::load(x.dx[m] + c * V), S::load(x.zx[m] + c * V)), sv, acc[m]);
    } else {
      const LaneCodes<S, BITS> codes(b, h);
      F t[M];
      for (int m = 0; m < M; ++m) t[m] = S::load(x.zx[m] + c * V);
#pragma GCC unroll 16
      for (int s = 0; s < W; ++s) {
        const F code = S::cvt(codes(s));
        for (int m = 0; m < M; ++m) t[m] = S::fma(code, S::load(x.xf[m] + c * C + s * V), t[m]);
      }
      for (int m = 0; m < M; ++m) acc[m] = S::fma(t[m], sv, acc[m]);
    }
  };
  auto high_of = [&](const uint8_t* hi) __attribute__((always_inline)) {
    if constexpr (BITS == 3) return Q8 ? S::widen8(hi) : S::widen16(hi);
    return S::izero();
  };
  // row n's whole chunks into acc (which starts with the row's share of a tail block, or zero), then its own tail
  // when it is not in a block, then y
  auto row = [&](int64_t n, int r, F* acc, bool own_tail) __attribute__((always_inline)) {
    const uint8_t* lo = q.w + n * rb;
    const uint8_t* high = lo + K / 4;  // int3's high plane
    const float* w = wins + r * wstride;
    if (q.offsets())
      for (int m = 0; m < M; ++m) acc[m] = S::add(acc[m], S::load(zneg + (r * M + m) * V));
    for (int64_t c = 0; c < full; ++c)
      chunk(rows, c, S::bytes(lo + c * 4 * V), high_of(high + c * 2 * V), scales(c, w, n * q.ng, idx + c * V), acc);
    if (tail && own_tail) {  // the last, partial chunk: nothing past the row is read, the codes past K are zero
      I h = S::izero();
      if constexpr (BITS == 3)
        h = Q8 ? S::widen8_part(high + full * 2 * V, tail_hi) : S::widen16_part(high + full * 2 * V, tail_hi);
      chunk(rows, full, S::bytes_part(lo + full * 4 * V, tail_lo), h, scales(full, w, n * q.ng, idx + full * V), acc);
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] += S::sum(acc[m]);
  };
  int64_t n = n0;
  if (B > 1) {
    const uint32_t lanes_of_row = (1u << tl) - 1;
    for (; n + B <= n1; n += B) {
      const uint8_t* lo[16];
      const uint8_t* hi[16];
      F zacc[M];
      for (int r = 0; r < B; ++r) {
        lo[r] = q.w + (n + r) * rb + full * 4 * V;
        hi[r] = q.w + (n + r) * rb + K / 4 + full * 2 * V;
        row_pass<S, M>(q, n + r, gsum, wins + r * wstride, zacc);
        if (q.offsets())
          for (int m = 0; m < M; ++m) S::store(zneg + (r * M + m) * V, zacc[m]);
      }
      // the block's tails in one chunk: lanes r tl .. r tl + tl-1 are row n + r's
      F sv = S::zero();
      for (int r = 0; r < B; ++r)
        sv = S::select(sv, scales(full, wins + r * wstride, (n + r) * q.ng, a.tidx), lanes_of_row << (r * tl));
      I h = S::izero();
      if constexpr (BITS == 3) h = Q8 ? S::gather8(hi, B, tail_hi) : S::gather16(hi, B, tail_hi);
      F tacc[M];
      for (int m = 0; m < M; ++m) tacc[m] = S::zero();
      chunk(block, 0, S::gather(lo, B, tail_lo), h, sv, tacc);
      for (int r = 0; r < B; ++r) {
        F acc[M];
        for (int m = 0; m < M; ++m) acc[m] = S::keep(tacc[m], lanes_of_row << (r * tl));
        row(n + r, r, acc, false);
      }
    }
  }
  for (; n < n1; ++n) {  // rows not in a tail block
    F acc[M];
    row_pass<S, M>(q, n, gsum, wins, acc);
    if (q.offsets())
      for (int m = 0; m < M; ++m) S::store(zneg + m * V, acc[m]);
    for (int m = 0; m < M; ++m) acc[m] = S::zero();
    row(n, 0, acc, true);
  }
}

// The dispatch to the kernel instances: activations (int8 / fp32), rows of x (1..kGemvRows), bits.
template <int BITS, int M>
void gemv_rows_simd_act(const GroupWeight& q, const Acts& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (a.q8) gemv_rows_simd<Simd, BITS, M, true>(q, a, n0, n1, y, ldy);
  else gemv_rows_simd<Simd, BITS, M, false>(q, a, n0, n1, y, ldy);
}

template <int BITS>
void gemv_rows_simd_rows(const GroupWeight& q, const Acts& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  with_rows(a.M, [&](auto m) { gemv_rows_simd_act<BITS, decltype(m)::value>(q, a, n0, n1, y, ldy); });
}

// The activations in the chunks' orders (see the top of this section), each chunk's lane-to-group map, and the
// activations summed per lane (the implied zero point's share, for symmetric weights) and per group (the zero
// points', for asymmetric ones).
template <int W>
void prepare_simd(Acts& a, int bits) {
  constexpr int V = Simd::V, C = V * W, steps = W / 4;
  const int64_t K = a.K, M = a.M, chunks = (K + C - 1) / C, lanes = K / W, per_group = a.G / W;
  a.stride = chunks * C;
  a.lanes = chunks * V;
  a.g0 = a.alloc<int32_t>(chunks);
  a.idx = a.alloc<int32_t>(chunks * V);
  std::vector<int32_t> group_of(a.lanes);  // each lane's group
  for (int64_t c = 0, lane = 0, group = 0, seen = 0; c < chunks; ++c) {
    const int64_t first = group;  // windows: the chunk's 16-group window; else its first group
    a.g0[c] = static_cast<int32_t>(Simd::kWindows ? first / 16 * 16 : first);
    for (int64_t l = 0; l < V; ++l, ++lane) {  // lanes past K (the last chunk's padding) keep its last group
      group_of[lane] = static_cast<int32_t>(group);
      a.idx[lane] = static_cast<int32_t>(group - a.g0[c]);  // < V: see Avx512::lanes
      if (lane + 1 < lanes && ++seen == per_group) {
        ++group;
        seen = 0;
      }
    }
  }
  const float zp = static_cast<float>(1 << (bits - 1));
  a.zx = a.alloc<float>(M * a.lanes);
  a.nozero = a.alloc<float>(a.lanes);
  if (a.q8) {
    a.xq = a.alloc<int8_t>(M * a.stride);
    a.dx = a.alloc<float>(M * a.lanes);
  } else {
    a.xf = a.alloc<float>(M * a.stride);
  }
  const int64_t full = K / C, tl = (K % C) / W;  // whole chunks; the partial one's lanes
  if (tl > 0 && V % tl == 0) {
    a.tail_rows = static_cast<int>(V / tl);
    a.tidx = a.alloc<int32_t>(V);
    for (int64_t l = 0; l < V; ++l) a.tidx[l] = a.idx[full * V + l % tl];
    if (a.q8) {
      a.txq = a.alloc<int8_t>(M * C);
      a.tdx = a.alloc<float>(M * V);
    } else {
      a.txf = a.alloc<float>(M * C);
    }
    a.tzx = a.alloc<float>(M * V);
  }
  std::vector<int8_t> pad_q(a.q8 ? a.stride : 0);  // a row of x zero-padded to whole chunks
  std::vector<float> pad_f(a.q8 ? 0 : a.stride);
  for (int64_t m = 0; m < M; ++m) {
    float* zx = a.zx + m * a.lanes;
    float* gsum = a.gsum + m * a.gstride;
    if (a.q8) {
      const QuantRow& r = a.q[m];
      std::copy(r.xq.begin(), r.xq.end(), pad_q.begin());
      int8_t* xq = a.xq + m * a.stride;
      for (int64_t c = 0; c < chunks; ++c)  // column c C + steps p + k: byte p of step k of chunk c
        for (int k = 0; k < steps; ++k)
          for (int p = 0; p < 4 * V; ++p) xq[c * C + k * 4 * V + p] = pad_q[c * C + steps * p + k];
      for (int64_t l = 0; l < lanes; ++l) {
        int32_t total = 0;
        for (int j = 0; j < W; ++j) total += pad_q[l * W + j];
        const float d = r.dx[(l * W) >> 5], v = d * static_cast<float>(total);
        a.dx[m * a.lanes + l] = d;
        zx[l] = -zp * v;
        gsum[group_of[l]] += v;
      }
      if (a.tail_rows > 1) {  // byte p of step k: row p / (4 tl)'s byte p % (4 tl)
        for (int k = 0; k < steps; ++k)
          for (int p = 0; p < 4 * V; ++p) a.txq[m * C + k * 4 * V + p] = xq[full * C + k * 4 * V + p % (4 * tl)];
        for (int l = 0; l < V; ++l) {
          a.tdx[m * V + l] = a.dx[m * a.lanes + full * V + l % tl];
          a.tzx[m * V + l] = zx[full * V + l % tl];
        }
      }
    } else {
      std::copy(a.x[m], a.x[m] + K, pad_f.begin());
      float* xf = a.xf + m * a.stride;
      for (int64_t c = 0; c < chunks; ++c)  // column c C + W l + s: lane l of lane code s of chunk c
        for (int s = 0; s < W; ++s)
          for (int l = 0; l < V; ++l) xf[c * C + s * V + l] = pad_f[c * C + W * l + s];
      for (int64_t l = 0; l < lanes; ++l) {
        float total = 0.f;
        for (int j = 0; j < W; ++j) total += pad_f[l * W + j];
        zx[l] = -zp * total;
        gsum[group_of[l]] += total;
      }
      if (a.tail_rows > 1) {  // lane l of lane code s: row l / tl's lane l % tl
        for (int s = 0; s < W; ++s)
          for (int l = 0; l < V; ++l) a.txf[m * C + s * V + l] = xf[full * C + s * V + l % tl];
        for (int l = 0; l < V; ++l) a.tzx[m * V + l] = zx[full * V + l % tl];
      }
    }
  }
}
#endif  // CMX_GROUP_SIMD

// The SIMD kernels' group sizes for `bits`-bit weights: multiples of W (the GEMV) and of V (the prompts'
// dequantization); other sizes the layout allows are computed in plain C++.
int64_t block(int64_t bits) {
#if CMX_GROUP_SIMD
  return std::max<int64_t>(columns_per_lane(static_cast<int>(bits)), Simd::V);
#else
  return bits == 4 ? 2 : 8;
#endif
}

Acts prepare(const at::Tensor& x, const GroupWeight& q, bool q8) {
  Acts a;
  a.M = x.size(0);
  a.K = q.K;
  a.G = q.G;
  a.q8 = q8;
  const int64_t ng = q.groups();
  a.gstride = (ng + 16 + 15) / 16 * 16;
  a.gsum = a.alloc<float>(a.M * a.gstride);
  for (int64_t m = 0; m < a.M; ++m) {
    const float* xm = x.data_ptr<float>() + m * q.K;
    a.x.push_back(xm);
    if (q8) a.q.push_back(quantize_row(xm, q.K));
  }
#if CMX_GROUP_SIMD
  a.simd = q.G % columns_per_lane(q.bits) == 0;
  if (a.simd) {  // (sums gsum itself)
    q.bits == 4 ? prepare_simd<8>(a, q.bits) : prepare_simd<16>(a, q.bits);
    return a;
  }
#endif
  for (int64_t m = 0; m < a.M; ++m) {
    float* gs = a.gsum + m * a.gstride;
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t e = g * q.G; e < (g + 1) * q.G; ++e)
        gs[g] += q8 ? static_cast<float>(a.q[m].xq[e]) * a.q[m].dx[e >> 5] : a.x[m][e];
  }
  return a;
}

void gemv_rows(const GroupWeight& q, const Acts& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
#if CMX_GROUP_SIMD
  if (a.simd) {
    if (q.bits == 4) return gemv_rows_simd_rows<4>(q, a, n0, n1, y, ldy);
    if (q.bits == 3) return gemv_rows_simd_rows<3>(q, a, n0, n1, y, ldy);
    return gemv_rows_simd_rows<2>(q, a, n0, n1, y, ldy);
  }
#endif
  gemv_rows_plain(q, a, n0, n1, y, ldy);
}

// The GEMVs' parallel loop over weight rows [0, N) (or panels of them): each task walks its rows `block` at a time
// (kBlockRows rows; all at once when x is one chunk) and calls f(chunk, r0, r1) for every chunk of kGemvRows rows of
// x on the block, so a block is read from memory once and from cache for the other chunks.
template <class F>
void over_blocks(int64_t N, int64_t grain_rows, int64_t chunks, F&& f, int64_t block = kBlockRows) {
  block = chunks > 1 ? block : N;
  at::parallel_for(0, N, grain_rows, [&](int64_t a, int64_t b) {
    for (int64_t s = a; s < b; s += block)
      for (int64_t c = 0; c < chunks; ++c) f(c, s, std::min(b, s + block));
  });
}

// For weights side by side (part i's rows start at start[i], start.back() in all): f(i, r0, r1) for each part's
// rows [r0, r1) that fall in [s, e), in its own numbering.
template <class F>
void over_parts(const std::vector<int64_t>& start, int64_t s, int64_t e, F&& f) {
  for (size_t i = 0; i + 1 < start.size(); ++i) {
    const int64_t r0 = std::max(s, start[i]) - start[i], r1 = std::min(e, start[i + 1]) - start[i];
    if (r0 < r1) f(i, r0, r1);
  }
}

// y[m, start_i + n] += (x W_i^T)[m, n] for one to kDecodeRows rows of x and the weights side by side (of one bit
// width): each weight row is read once per chunk of kGemvRows rows of x (from cache after the first), every part's
// rows in one parallel loop.
void group_gemv(const at::Tensor& x, const std::vector<GroupWeight>& parts, bool int8_act, float* y, int64_t ldy) {
  const int64_t M = x.size(0);
  if (M == 0) return;
  const bool q8 = int8_act && parts[0].K % 32 == 0;  // the int8 activations' blocks must tile the row
  std::vector<std::map<int64_t, Acts>> acts;  // per chunk of rows, by group size (the parts usually share it)
  acts.reserve((M + kGemvRows - 1) / kGemvRows);
  for (int64_t m0 = 0; m0 < M; m0 += kGemvRows) {
    const at::Tensor xc = x.narrow(0, m0, std::min(kGemvRows, M - m0));
    auto& chunk = acts.emplace_back();
    for (const auto& p : parts)
      if (!chunk.count(p.G)) chunk.emplace(p.G, prepare(xc, p, q8));
  }
  std::vector<int64_t> start{0};
  for (const auto& p : parts) start.push_back(start.back() + p.N);
  over_blocks(start.back(), grain(parts[0].row_bytes()), static_cast<int64_t>(acts.size()),
              [&](int64_t c, int64_t s, int64_t e) {
    over_parts(start, s, e, [&](size_t i, int64_t r0, int64_t r1) {
      gemv_rows(parts[i], acts[c].at(parts[i].G), r0, r1, y + c * kGemvRows * ldy + start[i], ldy);
    });
  });
}

template <int BITS>
void dequant_rows(const GroupWeight& q, int64_t n0, int64_t n1, float* out) {
  const int64_t K = q.K, ng = q.groups();
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
#if CMX_GROUP_SIMD
    if (const int64_t G = q.G; G % Simd::V == 0) {  // (code - zero) * scale, V columns at a time: exactly the reference's values
      const uint8_t* row = q.w + n * q.row_bytes();
      for (int64_t g = 0; g < ng; ++g) {
        const auto s = Simd::set(q.scale[n * ng + g]);
        if (q.mn) {  // code * scale + min
          const auto mn = Simd::set(static_cast<float>(q.mn[n * ng + g]));
          for (int64_t e = g * G; e < (g + 1) * G; e += Simd::V)
            Simd::store(o + e, Simd::add(Simd::mul(Simd::cvt(Simd::natural<BITS>(row, K, e)), s), mn));
          continue;
        }
        const auto z = Simd::set(q.zero_at(n * ng + g));
        for (int64_t e = g * G; e < (g + 1) * G; e += Simd::V)
          Simd::store(o + e, Simd::mul(Simd::sub(Simd::cvt(Simd::natural<BITS>(row, K, e)), z), s));
      }
      continue;
    }
#endif
    for (int64_t g = 0; g < ng; ++g) dequant_rows_plain<BITS>(q, n, g, o);
  }
}

DequantRows GroupWeight::dequant() const {
  const GroupWeight q = *this;
  if (bits == 4) return {N, [q](int64_t a, int64_t b, float* out) { dequant_rows<4>(q, a, b, out); }};
  if (bits == 3) return {N, [q](int64_t a, int64_t b, float* out) { dequant_rows<3>(q, a, b, out); }};
  return {N, [q](int64_t a, int64_t b, float* out) { dequant_rows<2>(q, a, b, out); }};
}

const char* linear_name(int bits) { return bits == 4 ? "q4_linear" : bits == 3 ? "q3_linear" : "q2_linear"; }

// q4_linear / q3_linear / q2_linear: y = x W^T (+ residual) for one group-quantized weight.
template <int BITS>
at::Tensor group_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor& zero, const c10::optional<at::Tensor>& residual, bool int8_act) {
  const GroupWeight q = group_weight(qweight, scale, zero, BITS);
  check_input(x, q.K, linear_name(BITS));
  const int64_t M = x.size(0);
  check_residual(residual, M, q.N);
  if (M > kDecodeRows) return tiled_gemm(x, q.K, {q.dequant()}, residual, false, int8_act && g_bf16_prompts);  // prompt
  at::Tensor y = new_output(residual, M, q.N);
  group_gemv(x, {q}, int8_act, y.data_ptr<float>(), q.N);
  return y;
}

at::Tensor silu_mul(const at::Tensor& gu);

// q4_linear_cat / ...: several weights that read the same input (q/k/v, gate/up), their outputs side by side: one
// call instead of several, without concatenating their weights (which would copy them at load). `silu`: two weights
// (gate, up) of equal rows give silu(gate) * up directly (see tiled_gemm). A zero tensor may be empty (symmetric)
// for some parts and not others.
template <int BITS>
at::Tensor group_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& qweights,
                            const std::vector<at::Tensor>& scales, const std::vector<at::Tensor>& zeros,
                            bool int8_act, bool silu) {
  const std::string what = std::string(linear_name(BITS)) + "_cat";
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size() && qweights.size() == zeros.size(),
              what, ": one scale and one zero tensor per weight");
  std::vector<GroupWeight> parts;
  for (size_t i = 0; i < qweights.size(); ++i) parts.push_back(group_weight(qweights[i], scales[i], zeros[i], BITS));
  TORCH_CHECK(!silu || (parts.size() == 2 && parts[0].N == parts[1].N),
              what, ": silu takes two weights (gate, up) of equal rows");
  const int64_t K = parts[0].K, M = x.size(0);
  for (const auto& p : parts) TORCH_CHECK(p.K == K, what, ": the weights read inputs of different widths");
  check_input(x, K, what.c_str());
  if (M > kDecodeRows) {  // prompts: every part into its columns of one output
    std::vector<DequantRows> rows;
    for (const auto& p : parts) rows.push_back(p.dequant());
    return tiled_gemm(x, K, rows, c10::nullopt, silu, int8_act && g_bf16_prompts);
  }
  int64_t total = 0;
  for (const auto& p : parts) total += p.N;
  at::Tensor y = at::zeros({M, total}, at::kFloat);
  group_gemv(x, parts, int8_act, y.data_ptr<float>(), total);
  return silu ? silu_mul(y) : y;
}

// ------------------------------------------------------------------------------------------------ panels
// The decoding layout of int4 / int3 / int2 weights fed int8 activations, repacked once at load by the runtime
// (codexmini.runtime.kernels.to_panels / to_lowbit_panels; the same bytes as the portable layout, reordered): rows in
// panels of kPanel = 16, so that output channels lie in SIMD lanes: one `vpdpbusd` multiplies 4 columns of 16
// channels by 4 broadcast activations of one row of x, the float epilogue (the group's scale and its zero points'
// share) is paid once per group for 16 channels, and no horizontal sum is left: where the portable layout's GEMV
// (lanes along the columns) pays 7 float operations per 2 dot products and row of x, this pays 3-4 per 8 (g32).
// - int4: panel p holds, for every word d of a row (4 bytes: columns 8d .. 8d+7, two per byte, low nibble first, as
//   in the portable layout), the 16 rows' words side by side (64 bytes, row 16p + l's at byte 4l). The activations
//   are reordered once per call: per word, the 4 even columns (the low nibbles' partners), then the 4 odd ones.
// - int2 / int3: panel p holds, for every step s of 16 columns, the 16 rows' 4 low-plane bytes side by side (64
//   bytes, as int4's words: byte j of a row holds the low two bits of columns 16s + 4j + k in bits 2k), and for int3
//   then the high bits as 4 masks of 64 bits (32 bytes), mask k's bit 4l + j the high bit of row l's column
//   16s + 4j + k. Field k of the 64 bytes (a GFNI bit-matrix product, or a shift and an and) is a vector of 16
//   channels x 4 codes; int3 adds 4 where mask k says (one masked byte add, the mask loaded straight into a mask
//   register). The activations are reordered to match: per step, for k = 0..3, columns 16s + k, +4, +8, +12.
// Scales, and zero points or mins, are [ng][16] per panel. Every group size that nests in the 32-column blocks of
// the int8 activations or is a multiple of them takes it (int4: 8, 16, 32, 64, ...; int3 / int2: 16, 32, 64, ...);
// each row of x is computed exactly as it is alone.
constexpr int64_t kPanel = 16;
// Prompts too take the panel GEMV (kGemvRows rows of x at a time over each block of kBlockRows weight rows) up to
// this many rows, and the tiled GEMM only beyond: on a 2-core AMD EPYC (AVX-512 VNNI and BF16, no AMX) the GEMV beat
// the tiled GEMM's dequantization plus bf16 matmul at every length measured (SmolLM2's matrices at 33-512 rows:
// 1.2-5x), so without AMX it has no limit; with AMX (bf16 tiles in oneDNN, several times the VNNI rate) long
// prompts go to the GEMM as for the other layouts.
#if defined(__AMX_BF16__)
constexpr int64_t kPanelRows = kDecodeRows;
#else
constexpr int64_t kPanelRows = std::numeric_limits<int64_t>::max();
#endif
constexpr int64_t kSlabRows = 256;  // a fused gate/up's rows per pass: at most [256, 2N] of their outputs at once

// int3 / int2 panels: bytes per 16-column step of a panel (16 rows' low-plane bytes, and int3's 4 masks).
constexpr int64_t lowbit_step_bytes(int64_t bits) { return bits == 3 ? 96 : 64; }

struct PanelWeight {
  int64_t bits, N, K, G, ng;
  const uint8_t* w;     // int4: [N/16][K/8][16] words; int3 / int2: [N/16][K/16] steps of step_bytes()
  Scales scale;         // [N/16][ng][16]
  const uint8_t* zero;  // the same, zero points (asymmetric), or nullptr: symmetric (the implied 2^(bits-1))
  const c10::Half* mn;  // the same, the `_min` schemes' offsets, or nullptr
  int64_t words() const { return K / 8; }
  int64_t step_bytes() const { return lowbit_step_bytes(bits); }
  int64_t at(int64_t n, int64_t g) const { return (n / kPanel * ng + g) * kPanel + n % kPanel; }  // group (n, g)'s
  const uint8_t* word(int64_t n, int64_t d) const { return w + ((n / kPanel * words() + d) * kPanel + n % kPanel) * 4; }
  DequantRows dequant() const;
};

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CMX_PANELS 1
#else
#define CMX_PANELS 0
#endif

// Whether a weight of N rows, K columns and groups of G takes the panels (on this build): the one rule, which the
// runtime asks through panel_layout() before it repacks.
bool panel_layout(int64_t N, int64_t K, int64_t G, int64_t bits) {
  const int64_t smallest = bits == 4 ? 8 : 16;  // a group holds whole words (int4) or steps (int3 / int2)
  return CMX_PANELS && (bits == 4 || bits == 3 || bits == 2) && N % kPanel == 0 && K % 32 == 0 && G > 0 &&
         K % G == 0 && (G % 32 == 0 || (32 % G == 0 && G % smallest == 0));
}

const char* panel_name(int64_t bits) { return bits == 4 ? "q4p_linear" : bits == 3 ? "q3p_linear" : "q2p_linear"; }

PanelWeight panel_weight(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero, int64_t bits) {
  const char* what = panel_name(bits);
  TORCH_CHECK(CMX_PANELS, what, ": panels need a build with AVX-512 VNNI (kernels.panels() is 0 here)");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              what, ": qweight must be a contiguous uint8 [N, K*", bits, "/8]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8 / bits;
  TORCH_CHECK(N % kPanel == 0 && K % 32 == 0 && qweight.size(1) * 8 % bits == 0, what, ": N must be a multiple of ",
              kPanel, " and K of 32, got N=", N, " K=", K);
  TORCH_CHECK(is_scale_dtype(scale) && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N &&
              scale.size(1) > 0 && K % scale.size(1) == 0, what, ": scale must be a contiguous float32 or "
              "float16 [N, K/G]");
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(panel_layout(N, K, G, bits), what, ": group size ", G, " is neither a multiple of 32 nor ",
              bits == 4 ? "8 or 16" : "16");
  const bool mins = zero.numel() && zero.scalar_type() == at::kHalf;
  TORCH_CHECK(zero.numel() == 0 || ((zero.scalar_type() == at::kByte || mins) && zero.is_contiguous() &&
                                    zero.sizes() == scale.sizes()),
              what, ": zero must be shaped like scale (uint8 zero points or float16 mins) or empty (symmetric)");
  return {bits, N, K, G, scale.size(1), qweight.data_ptr<uint8_t>(), scales_of(scale),
          zero.numel() && !mins ? zero.data_ptr<uint8_t>() : nullptr, mins ? zero.data_ptr<c10::Half>() : nullptr};
}

// The int8 activations of up to kGemvRows rows of x in the panels' order.
struct PanelActs {
  int64_t M = 0;
  std::vector<int32_t> xw;  // [M][K/4] int4: per word, the even columns' 4 int8 activations, then the odd ones';
                            // int3 / int2: per step and k, those of columns 16s + k, +4, +8, +12
  std::vector<float> dx;    // [M][K/32] their block scales
  std::vector<float> xs;    // [M][ng] the (dequantized) activations summed per group: the zero points' share
  std::vector<int32_t> zs;  // [M][K / min(G, 32)] -2^(bits-1) times the int8 activations' sum per sub-block (a
                            // group, or a 32-column block of one): a symmetric weight's implied zero point, in integers
};

PanelActs panel_acts(const float* x, int64_t M, const PanelWeight& q) {
  PanelActs a;
  a.M = M;
  const int64_t K = q.K;
  a.xw.resize(M * K / 4);
  a.dx.resize(M * K / 32);
  a.xs.assign(M * q.ng, 0.f);
  const int64_t sub = std::min<int64_t>(q.G, 32), subs = K / sub;
  a.zs.resize(M * subs);
  for (int64_t m = 0; m < M; ++m) {
    const QuantRow r = quantize_row(x + m * K, K);
    for (int64_t b = 0; b < subs; ++b) {  // a sub-block lies in one group and one 32-column block: an exact sum
      int32_t t = 0;
      for (int64_t e = b * sub; e < (b + 1) * sub; ++e) t += r.xq[e];
      a.zs[m * subs + b] = -(1 << (q.bits - 1)) * t;
      a.xs[m * q.ng + b * sub / q.G] += static_cast<float>(t) * r.dx[b * sub / 32];
    }
    int8_t* out = reinterpret_cast<int8_t*>(a.xw.data() + m * K / 4);
    if (q.bits == 4) {
      for (int64_t d = 0; d < K / 8; ++d)
        for (int j = 0; j < 4; ++j) {
          out[8 * d + j] = r.xq[8 * d + 2 * j];
          out[8 * d + 4 + j] = r.xq[8 * d + 2 * j + 1];
        }
    } else {
      for (int64_t st = 0; st < K / 16; ++st)
        for (int k = 0; k < 4; ++k)
          for (int j = 0; j < 4; ++j) out[16 * st + 4 * k + j] = r.xq[16 * st + 4 * j + k];
    }
    std::copy(r.dx.begin(), r.dx.end(), a.dx.begin() + m * K / 32);
  }
  return a;
}

#if CMX_PANELS
// The 16 codes of row n, step st of an int3 / int2 panel weight (columns 16 st .. 16 st + 15) as int32 lanes: the
// row's 4 low-plane bytes hold column c's low bits at bit 2c; int3's high bit of column c = 4j + k is bit 4l + j of
// mask k.
inline __m512i lowbit_step_codes(const PanelWeight& q, int64_t n, int64_t st) {
  const int64_t l = n % kPanel;
  const uint8_t* sp = q.w + (n / kPanel * (q.K / 16) + st) * q.step_bytes();
  uint32_t low, high = 0;
  std::memcpy(&low, sp + 4 * l, 4);
  const __m512i c = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(low)), _mm512_add_epi32(c, c)),
                                   _mm512_set1_epi32(3));
  if (q.bits == 3) {
    for (int k = 0; k < 4; ++k) {
      uint64_t mask;
      std::memcpy(&mask, sp + 64 + 8 * k, 8);
      const uint32_t nibble = static_cast<uint32_t>(mask >> (4 * l)) & 0x0F;  // columns 4j + k, j = 0..3
      for (int j = 0; j < 4; ++j) high |= ((nibble >> j) & 1u) << (4 * j + k);
    }
    codes = _mm512_or_si512(codes, _mm512_slli_epi32(_mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(high)), c), _mm512_set1_epi32(1)), 2));
  }
  return codes;
}

// Rows a..b-1 as fp32 for the tiled GEMM, 16 columns at a time (the same operations as the reference).
DequantRows PanelWeight::dequant() const {
  return {N, [q = *this](int64_t a, int64_t b, float* out) {
    for (int64_t n = a; n < b; ++n) {
      float* o = out + (n - a) * q.K;
      for (int64_t e = 0; e < q.K; e += 16) {  // int4: two words, in one group or (G = 8) two; else one step
        __m512i codes;
        if (q.bits == 4) {
          uint32_t lo, hi;
          std::memcpy(&lo, q.word(n, e / 8), 4);
          std::memcpy(&hi, q.word(n, e / 8 + 1), 4);
          const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(lo))),
                                               _mm256_set1_epi32(static_cast<int>(hi)), 1);
          codes = _mm512_and_si512(
              _mm512_srlv_epi32(v, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
              _mm512_set1_epi32(0x0F));
        } else {
          codes = lowbit_step_codes(q, n, e / 16);
        }
        const __m512 c = _mm512_cvtepi32_ps(codes);
        const int64_t i0 = q.at(n, e / q.G), i1 = q.at(n, (e + 15) / q.G);
        auto pair = [](float x, float y) { return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(x), _mm512_set1_ps(y)); };
        const __m512 s = pair(q.scale[i0], q.scale[i1]);
        if (q.mn) {
          const __m512 m = pair(static_cast<float>(q.mn[i0]), static_cast<float>(q.mn[i1]));
          _mm512_storeu_ps(o + e, _mm512_add_ps(_mm512_mul_ps(c, s), m));
        } else {
          const __m512 z = q.zero ? pair(q.zero[i0], q.zero[i1])
                                  : _mm512_set1_ps(static_cast<float>(1 << (q.bits - 1)));  // the implied zero
          _mm512_storeu_ps(o + e, _mm512_mul_ps(_mm512_sub_ps(c, z), s));
        }
      }
    }
  }};
}

// (The two panel kernels, int4's and int3 / int2's below, repeat their frame on purpose: with it in shared inline
// helpers the accumulators left registers, 8 rows 18% slower, and as a lambda 20-45%; bench_kernels --table stack.)
// y[m, 16p + l] += sum over the panel's columns for panels p0..p1-1 and M rows of x; SW words per sub-block (the
// group, or a 32-column block of it).
// SYM: a symmetric weight, whose implied zero point starts each sub-block's integer sum (`zs`) instead of costing
// a float FMA per group.
template <int M, int SW, bool SYM>
void panel_rows(const PanelWeight& q, const PanelActs& a, int64_t p0, int64_t p1, float* y, int64_t ldy) {
  const int64_t W = q.words(), ng = q.ng, subs = q.G / (8 * SW), K = q.K;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int32_t* xw[M];
  const float* dx[M];
  const float* xs[M];
  const int32_t* zs[M];
  for (int m = 0; m < M; ++m) {
    xw[m] = a.xw.data() + m * K / 4;
    dx[m] = a.dx.data() + m * K / 32;
    xs[m] = a.xs.data() + m * ng;
    zs[m] = a.zs.data() + m * K / (8 * SW);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wp = q.w + p * W * 64;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t si = (p * ng + g) * kPanel;
      const __m512 sw = q.scale.half ? _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(q.scale.at(si))))
                                     : _mm512_loadu_ps(static_cast<const float*>(q.scale.at(si)));
      __m512 off = _mm512_setzero_ps();  // the group's offset per unit of the activations' sum (not SYM)
      if (SYM) {
      } else if (q.mn) {
        off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.mn + si)));
      } else {
        off = _mm512_mul_ps(sw, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.zero + si))))));
      }
      __m512 f[M];
      for (int64_t s = 0; s < subs; ++s) {
        const int64_t b = g * subs + s, d0 = b * SW, blk = d0 / 4;  // sub-block, its first word, its 32 columns
        __m512i isum[M];
        for (int m = 0; m < M; ++m) isum[m] = SYM ? _mm512_set1_epi32(zs[m][b]) : _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int k = 0; k < SW; ++k) {
          __builtin_prefetch(wp + (d0 + k) * 64 + kPrefetchBytes);
          const __m512i v = _mm512_loadu_si512(wp + (d0 + k) * 64);
          const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          for (int m = 0; m < M; ++m) {
            isum[m] = _mm512_dpbusd_epi32(isum[m], lo, _mm512_set1_epi32(xw[m][2 * (d0 + k)]));
            isum[m] = _mm512_dpbusd_epi32(isum[m], hi, _mm512_set1_epi32(xw[m][2 * (d0 + k) + 1]));
          }
        }
        for (int m = 0; m < M; ++m) {  // (explicit FMAs: no mul + add the compiler may or may not contract)
          const __m512 c = _mm512_cvtepi32_ps(isum[m]), d = _mm512_set1_ps(dx[m][blk]);
          f[m] = s ? _mm512_fmadd_ps(c, d, f[m]) : _mm512_mul_ps(c, d);
        }
      }
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(f[m], sw, acc[m]);
        if (!SYM) acc[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(xs[m][g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float* o = y + m * ldy + p * kPanel;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[m]));
    }
  }
}

// The int3 / int2 panels: as panel_rows, SS 16-column steps per sub-block (1: groups of 16; 2: a 32-column block).
template <int M, int SS, bool SYM, int BITS>
void lowbit_panel_rows(const PanelWeight& q, const PanelActs& a, int64_t p0, int64_t p1, float* y, int64_t ldy) {
  constexpr int64_t SB = lowbit_step_bytes(BITS);
  const int64_t steps = q.K / 16, ng = q.ng, subs = q.G / (16 * SS), K = q.K;
  const __m512i three = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
  const int32_t* xw[M];
  const float* dx[M];
  const float* xs[M];
  const int32_t* zs[M];
  for (int m = 0; m < M; ++m) {
    xw[m] = a.xw.data() + m * K / 4;
    dx[m] = a.dx.data() + m * K / 32;
    xs[m] = a.xs.data() + m * ng;
    zs[m] = a.zs.data() + m * K / (16 * SS);
  }
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* wp = q.w + p * steps * SB;
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t si = (p * ng + g) * kPanel;
      const __m512 sw = q.scale.half ? _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(q.scale.at(si))))
                                     : _mm512_loadu_ps(static_cast<const float*>(q.scale.at(si)));
      __m512 off = _mm512_setzero_ps();  // the group's offset per unit of the activations' sum (not SYM)
      if (SYM) {
      } else if (q.mn) {
        off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.mn + si)));
      } else {
        off = _mm512_mul_ps(sw, _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(q.zero + si))))));
      }
      __m512 f[M];
      for (int64_t s = 0; s < subs; ++s) {
        const int64_t b = g * subs + s, s0 = b * SS, blk = s0 * 16 / 32;  // sub-block, its first step, its block
        __m512i isum[M];
        for (int m = 0; m < M; ++m) isum[m] = SYM ? _mm512_set1_epi32(zs[m][b]) : _mm512_setzero_si512();
        for (int t = 0; t < SS; ++t) {
          const uint8_t* sp = wp + (s0 + t) * SB;
          __builtin_prefetch(sp + kPrefetchBytes);
          if (BITS == 3) __builtin_prefetch(sp + 64 + kPrefetchBytes);
          const __m512i v = _mm512_loadu_si512(sp);
          const int32_t* xk[M];
          for (int m = 0; m < M; ++m) xk[m] = xw[m] + 4 * (s0 + t);
#pragma GCC unroll 4
          for (int k = 0; k < 4; ++k) {
#if defined(__GFNI__)  // bits 2k, 2k+1 of every byte into bits 0, 1 (a bit-matrix product: one instruction)
            __m512i c = k ? _mm512_gf2p8affine_epi64_epi8(
                                v, _mm512_set1_epi64(static_cast<long long>((1ull << (2 * k) << 56) |
                                                                            (1ull << (2 * k + 1) << 48))), 0)
                          : _mm512_and_si512(v, three);
#else
            __m512i c = _mm512_and_si512(k ? _mm512_srli_epi16(v, 2 * k) : v, three);
#endif
            if (BITS == 3) {  // (the mask straight from memory into a mask register)
              __mmask64* hk = reinterpret_cast<__mmask64*>(const_cast<uint8_t*>(sp + 64 + 8 * k));
              c = _mm512_mask_add_epi8(c, _load_mask64(hk), c, four);
            }
            for (int m = 0; m < M; ++m) isum[m] = _mm512_dpbusd_epi32(isum[m], c, _mm512_set1_epi32(xk[m][k]));
          }
        }
        for (int m = 0; m < M; ++m) {  // (explicit FMAs: no mul + add the compiler may or may not contract)
          const __m512 c = _mm512_cvtepi32_ps(isum[m]), d = _mm512_set1_ps(dx[m][blk]);
          f[m] = s ? _mm512_fmadd_ps(c, d, f[m]) : _mm512_mul_ps(c, d);
        }
      }
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(f[m], sw, acc[m]);
        if (!SYM) acc[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(xs[m][g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float* o = y + m * ldy + p * kPanel;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[m]));
    }
  }
}

template <int M, int BITS>
void lowbit_panel_gemv_rows(const PanelWeight& q, const PanelActs& a, int64_t p0, int64_t p1, float* y, int64_t ldy) {
  const bool sym = !q.zero && !q.mn;
  if (q.G == 16) sym ? lowbit_panel_rows<M, 1, true, BITS>(q, a, p0, p1, y, ldy)
                     : lowbit_panel_rows<M, 1, false, BITS>(q, a, p0, p1, y, ldy);
  else sym ? lowbit_panel_rows<M, 2, true, BITS>(q, a, p0, p1, y, ldy)
           : lowbit_panel_rows<M, 2, false, BITS>(q, a, p0, p1, y, ldy);
}

void panel_gemv_rows(const PanelWeight& q, const PanelActs& a, int64_t p0, int64_t p1, float* y, int64_t ldy) {
  const int64_t sw = std::min<int64_t>(q.G, 32) / 8;
  with_rows(a.M, [&](auto m) {
    constexpr int M = decltype(m)::value;
    const bool sym = !q.zero && !q.mn;
    if (q.bits == 3) lowbit_panel_gemv_rows<M, 3>(q, a, p0, p1, y, ldy);
    else if (q.bits == 2) lowbit_panel_gemv_rows<M, 2>(q, a, p0, p1, y, ldy);
    else if (sw == 1)
      sym ? panel_rows<M, 1, true>(q, a, p0, p1, y, ldy) : panel_rows<M, 1, false>(q, a, p0, p1, y, ldy);
    else if (sw == 2)
      sym ? panel_rows<M, 2, true>(q, a, p0, p1, y, ldy) : panel_rows<M, 2, false>(q, a, p0, p1, y, ldy);
    else sym ? panel_rows<M, 4, true>(q, a, p0, p1, y, ldy) : panel_rows<M, 4, false>(q, a, p0, p1, y, ldy);
  });
}
#else  // never reached: panel_weight refuses
DequantRows PanelWeight::dequant() const { return {N, [](int64_t, int64_t, float*) {}}; }
void panel_gemv_rows(const PanelWeight&, const PanelActs&, int64_t, int64_t, float*, int64_t) {}
#endif

// y[m, start_i + n] += (x W_i^T)[m, n] for up to kPanelRows rows of x and panel weights side by side: as
// group_gemv, in blocks of kBlockRows rows (4 panels) while they are in cache, kGemvRows rows of x at a time.
void panel_gemv(const at::Tensor& x, const std::vector<PanelWeight>& parts, float* y, int64_t ldy) {
  const int64_t M = x.size(0), K = parts[0].K;
  if (M == 0) return;
  // per chunk of rows, by group size; a prompt's chunks prepared in parallel
  std::vector<std::map<int64_t, PanelActs>> acts((M + kGemvRows - 1) / kGemvRows);
  at::parallel_for(0, static_cast<int64_t>(acts.size()), 4, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (const auto& p : parts)
        if (!acts[c].count(p.G))
          acts[c].emplace(p.G, panel_acts(x.data_ptr<float>() + c * kGemvRows * K,
                                          std::min(kGemvRows, M - c * kGemvRows), p));
  });
  std::vector<int64_t> start{0};  // in panels
  for (const auto& p : parts) start.push_back(start.back() + p.N / kPanel);
  over_blocks(start.back(), (grain(K * parts[0].bits / 8) + kPanel - 1) / kPanel, static_cast<int64_t>(acts.size()),
              [&](int64_t c, int64_t s, int64_t e) {
    over_parts(start, s, e, [&](size_t i, int64_t r0, int64_t r1) {
      panel_gemv_rows(parts[i], acts[c].at(parts[i].G), r0, r1, y + c * kGemvRows * ldy + start[i] * kPanel, ldy);
    });
  }, kBlockRows / kPanel);
}

// panel_dequant: a weight in panels as fp32 [N, K], what a long prompt multiplies where the CPU has AMX (the test of
// that path on CPUs without it).
at::Tensor panel_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero, int64_t bits) {
  const PanelWeight q = panel_weight(qweight, scale, zero, bits);
  at::Tensor out = at::empty({q.N, q.K}, at::kFloat);
  q.dequant().rows(0, q.N, out.data_ptr<float>());
  return out;
}

// q4p_linear / q3p_linear / q2p_linear: y = x W^T (+ residual) for a weight in panels (int8 activations, up to
// kPanelRows rows).
template <int BITS>
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                        const c10::optional<at::Tensor>& residual) {
  const PanelWeight q = panel_weight(qweight, scale, zero, BITS);
  check_input(x, q.K, panel_name(BITS));
  const int64_t M = x.size(0);
  check_residual(residual, M, q.N);
  if (M > kPanelRows) return tiled_gemm(x, q.K, {q.dequant()}, residual, false, g_bf16_prompts);  // long prompt
  at::Tensor y = new_output(residual, M, q.N);
  panel_gemv(x, {q}, y.data_ptr<float>(), q.N);
  return y;
}

// q4p_linear_cat / ...: several panel weights of one bit width on one input, outputs side by side (see
// group_linear_cat).
template <int BITS>
at::Tensor panel_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& qweights,
                            const std::vector<at::Tensor>& scales, const std::vector<at::Tensor>& zeros, bool silu) {
  const std::string what = std::string(panel_name(BITS)) + "_cat";
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size() && qweights.size() == zeros.size(),
              what, ": one scale and one zero tensor per weight");
  std::vector<PanelWeight> parts;
  for (size_t i = 0; i < qweights.size(); ++i) parts.push_back(panel_weight(qweights[i], scales[i], zeros[i], BITS));
  TORCH_CHECK(!silu || (parts.size() == 2 && parts[0].N == parts[1].N),
              what, ": silu takes two weights (gate, up) of equal rows");
  const int64_t K = parts[0].K, M = x.size(0);
  for (const auto& p : parts) TORCH_CHECK(p.K == K, what, ": the weights read inputs of different widths");
  check_input(x, K, what.c_str());
  if (M > kPanelRows) {
    std::vector<DequantRows> rows;
    for (const auto& p : parts) rows.push_back(p.dequant());
    return tiled_gemm(x, K, rows, c10::nullopt, silu, g_bf16_prompts);
  }
  int64_t total = 0;
  for (const auto& p : parts) total += p.N;
  if (!silu) {
    at::Tensor y = at::zeros({M, total}, at::kFloat);
    panel_gemv(x, parts, y.data_ptr<float>(), total);
    return y;
  }
  // silu(gate) * up a slab of rows at a time: a long prompt never holds the [M, 2N] product
  at::Tensor y = at::empty({M, parts[0].N}, at::kFloat);
  for (int64_t m0 = 0; m0 < M; m0 += kSlabRows) {
    const int64_t rows = std::min(kSlabRows, M - m0);
    at::Tensor gu = at::zeros({rows, total}, at::kFloat);
    panel_gemv(x.narrow(0, m0, rows), parts, gu.data_ptr<float>(), total);
    const float* g = gu.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      silu_times_n(g + r * total, g + r * total + parts[0].N, y.data_ptr<float>() + (m0 + r) * parts[0].N, parts[0].N);
  }
  return y;
}

// ------------------------------------------------------------------------------------------------ int8
// A per-channel int8 weight, checked, and its rows as fp32 for tiled_gemm.
struct Q8Weight {
  int64_t N, K;
  const int8_t* w;
  Scales scale;  // [N]
  DequantRows dequant() const {
    return {N, [*this](int64_t a, int64_t b, float* out) {
      for (int64_t n = a; n < b; ++n)
        for (int64_t k = 0; k < K; ++k) out[(n - a) * K + k] = static_cast<float>(w[n * K + k]) * scale[n];
    }};
  }
};

Q8Weight q8_weight(const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "int8 qweight must be a contiguous int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(is_scale_dtype(scale) && scale.is_contiguous() && scale.numel() == N,
              "int8 scale must be a contiguous float32 or float16 [N]");
  return {N, K, qweight.data_ptr<int8_t>(), scales_of(scale)};
}

#if defined(__AVX2__) && defined(__FMA__)
// The integer dot product of one 32-column block, as 8 fp32 lane sums: unsigned |w| times the int8 activations
// carrying w's sign (the sign trick: u8 x s8 is what the instructions multiply).
inline __m256 q8_dot32(__m256i ua, __m256i sx) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, sx));
#else  // |pair sums| <= 2 * 127 * 127: maddubs' int16 sums do not saturate
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ua, sx), _mm256_set1_epi16(1)));
#endif
}
#endif

// Decoding: y[m, n] += (x W^T)[m, n] * scale[n] for the weight rows n0..n1-1 and M (one to kGemvRows) rows of x, each
// weight row read once for all of them: its 32-column blocks are made unsigned (int8 activations `xq`, the int8
// rows of x; the reference is int8_activations times the dequantized weight) or widened to fp32 (`xq` null: exact
// up to the order of fp32 additions) once for all M rows. Each row keeps two accumulators (two FMA chains), the
// same for every M: a row of a batch is computed exactly as it is alone.
template <int M>
void q8_gemv_rows(const Q8Weight& q, const float* x, const QuantRow* xq, int64_t n0, int64_t n1, float* y) {
  const int64_t K = q.K, N = q.N;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q.w + n * K;
    float total[M];
    int64_t k = 0;  // the columns the SIMD loop did
#if defined(__AVX2__) && defined(__FMA__)
    constexpr int A = 2;  // accumulators per row
    __m256 acc[M * A];
    for (int i = 0; i < M * A; ++i) acc[i] = _mm256_setzero_ps();
    if (xq) {
      for (int64_t b = 0; b < K / 32; ++b, k += 32) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
        const __m256i ua = _mm256_sign_epi8(wv, wv);
        for (int m = 0; m < M; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[m].xq.data() + k));
          __m256& a = acc[m * A + b % A];
          a = _mm256_fmadd_ps(q8_dot32(ua, _mm256_sign_epi8(xv, wv)), _mm256_set1_ps(xq[m].dx[b]), a);
        }
      }
    } else {
      for (int64_t c = 0; k + 8 <= K; k += 8, ++c) {
        const __m256 wf =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
        for (int m = 0; m < M; ++m) {
          __m256& a = acc[m * A + c % A];
          a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k), a);
        }
      }
    }
    for (int m = 0; m < M; ++m) total[m] = hsum(_mm256_add_ps(acc[m * A], acc[m * A + 1]));
#else
    for (int m = 0; m < M; ++m) total[m] = 0.f;
#endif
    for (int m = 0; m < M; ++m) {  // the columns left, column by column
      float t = total[m];
      if (xq) {
        for (int64_t b = k / 32; b < K / 32; ++b) {
          int32_t d = 0;
          for (int j = 0; j < 32; ++j) d += static_cast<int32_t>(w[b * 32 + j]) * xq[m].xq[b * 32 + j];
          t += static_cast<float>(d) * xq[m].dx[b];
        }
      } else {
        for (int64_t e = k; e < K; ++e) t += x[m * K + e] * static_cast<float>(w[e]);
      }
      y[m * N + n] += t * q.scale[n];
    }
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define CMX_Q8_VNNI 1
// The int8 activations as AVX-512 VNNI's fast path reads them: per row of x, its codes plus 128 (unsigned: xq ^ 0x80)
// and each int32 lane's block scale (lane l of a 64-column step sums columns 4l .. 4l+3, of block l / 8), both
// zero-padded to whole steps.
struct Q8Lanes {
  int64_t steps = 0;
  uint8_t* xu = nullptr;  // [M, steps * 64]
  float* dx = nullptr;    // [M, steps * 16]
  std::vector<uint8_t> hold_xu, hold_dx;
  Q8Lanes(const std::vector<QuantRow>& rows, int64_t K) : steps((K + 63) / 64) {
    const int64_t M = static_cast<int64_t>(rows.size());
    xu = buffer<uint8_t>(hold_xu, M * steps * 64);
    dx = buffer<float>(hold_dx, M * steps * 16);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) xu[m * steps * 64 + k] = static_cast<uint8_t>(rows[m].xq[k]) ^ 0x80;
      for (int64_t l = 0; l < K / 4; ++l) dx[m * steps * 16 + l] = rows[m].dx[l / 8];
    }
  }
};

// int8 activations on AVX-512 VNNI: 64 columns a step, each weight step loaded once for all M rows. The unsigned
// codes xq + 128 times the signed weights, started from -128 * (the lane's weight sum), give each lane's exact
// sum of xq * w in one `vpdpbusd` per row (the weight sums are one more `vpdpbusd` per step, shared by the rows).
// Each row keeps two accumulators, the same for every M: a row of a batch is computed exactly as it is alone.
template <int M>
void q8_gemv_rows_vnni(const Q8Weight& q, const Q8Lanes& a, int64_t n0, int64_t n1, float* y) {
  const int64_t K = q.K, N = q.N, steps = a.steps, xs = steps * 64, ds = steps * 16;
  const __mmask64 last = K % 64 ? (~0ull >> (64 - K % 64)) : ~0ull;  // the last step's columns
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q.w + n * K;
    __m512 acc[2 * M];
    for (int i = 0; i < 2 * M; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < steps; ++c) {
      __builtin_prefetch(w + c * 64 + kPrefetchBytes);
      const __m512i wv = c + 1 < steps ? _mm512_loadu_si512(w + c * 64) : _mm512_maskz_loadu_epi8(last, w + c * 64);
      const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(),
                                             _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wv));
      for (int m = 0; m < M; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(start, _mm512_load_si512(a.xu + m * xs + c * 64), wv);
        __m512& t = acc[2 * m + (c & 1)];
        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_load_ps(a.dx + m * ds + c * 16), t);
      }
    }
    for (int m = 0; m < M; ++m)
      y[m * N + n] += _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * m], acc[2 * m + 1])) * q.scale[n];
  }
}
#else
#define CMX_Q8_VNNI 0
#endif

// y += x W^T * scale for one to kDecodeRows rows of x (`rows`: their int8 activations, or empty for fp32), kGemvRows
// rows at a time over each block of kBlockRows weight rows (see group_gemv).
void q8_gemv(const Q8Weight& q, const float* x, int64_t M, const std::vector<QuantRow>& rows, float* y) {
  const int64_t chunks = (M + kGemvRows - 1) / kGemvRows;
  auto rows_of = [&](int64_t c) { return std::min(kGemvRows, M - c * kGemvRows); };
#if CMX_Q8_VNNI
  if (!rows.empty()) {
    std::vector<Q8Lanes> lanes;
    lanes.reserve(chunks);
    for (int64_t c = 0; c < chunks; ++c)
      lanes.emplace_back(std::vector<QuantRow>(rows.begin() + c * kGemvRows, rows.begin() + c * kGemvRows + rows_of(c)),
                         q.K);
    over_blocks(q.N, grain(q.K), chunks, [&](int64_t c, int64_t s, int64_t e) {
      with_rows(rows_of(c), [&](auto m) {
        q8_gemv_rows_vnni<decltype(m)::value>(q, lanes[c], s, e, y + c * kGemvRows * q.N);
      });
    });
    return;
  }
#endif
  over_blocks(q.N, grain(q.K), chunks, [&](int64_t c, int64_t s, int64_t e) {
    const QuantRow* xq = rows.empty() ? nullptr : rows.data() + c * kGemvRows;
    with_rows(rows_of(c), [&](auto m) {
      q8_gemv_rows<decltype(m)::value>(q, x + c * kGemvRows * q.K, xq, s, e, y + c * kGemvRows * q.N);
    });
  });
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& residual, bool int8_act) {
  const Q8Weight q8 = q8_weight(qweight, scale);
  const int64_t N = q8.N, K = q8.K;
  check_input(x, K, "q8_linear");
  const int64_t M = x.size(0);
  check_residual(residual, M, N);
  if (M > kDecodeRows) return tiled_gemm(x, K, {q8.dequant()}, residual, false, int8_act && g_bf16_prompts);  // prompt
  at::Tensor y = new_output(residual, M, N);
  const float* xp = x.data_ptr<float>();
  std::vector<QuantRow> rows;  // int8 activations, where their 32-column blocks tile the row
  if (int8_act && K % 32 == 0)
    for (int64_t m = 0; m < M; ++m) rows.push_back(quantize_row(xp + m * K, K));
  float* yp = y.data_ptr<float>();
  if (M > 0) q8_gemv(q8, xp, M, rows, yp);
  return y;
}

// Several int8 layers that read the same input, their outputs side by side (see group_linear_cat).
at::Tensor q8_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& qweights,
                         const std::vector<at::Tensor>& scales, bool int8_act, bool silu) {
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size(), "q8_linear_cat: one scale tensor per weight");
  TORCH_CHECK(!silu || qweights.size() == 2, "q8_linear_cat: silu takes two weights (gate, up)");
  std::vector<Q8Weight> parts;
  for (size_t i = 0; i < qweights.size(); ++i) parts.push_back(q8_weight(qweights[i], scales[i]));
  for (const auto& p : parts)
    TORCH_CHECK(p.K == parts[0].K, "q8_linear_cat: the weights read inputs of different widths");
  check_input(x, parts[0].K, "q8_linear_cat");
  if (x.size(0) > kDecodeRows) {
    std::vector<DequantRows> rows;
    for (const auto& p : parts) rows.push_back(p.dequant());
    return tiled_gemm(x, parts[0].K, rows, c10::nullopt, silu, int8_act && g_bf16_prompts);
  }
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < qweights.size(); ++i)
    outs.push_back(q8_linear(x, qweights[i], scales[i], c10::nullopt, int8_act));
  at::Tensor y = at::cat(outs, 1);
  return silu ? silu_mul(y) : y;
}

// ------------------------------------------------------------------------------------------------ layer helpers
// Fused versions of the small per-layer steps of decoding, each one call instead of several tensor ops (their
// references are the codexmini.ops functions runtime/model.py calls otherwise; tests/runtime/test_cmx_kernels.py
// compares them).

// w * x / sqrt(mean(x^2) + eps), row by row: x [T, D], w [D].
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  total = hsum(acc);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "rms_norm: x must be float32 [T, D]");
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "rms_norm: w must be float32 [D]");
  at::Tensor y = at::empty({T, D}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* r = xp + t * D;
    const float ss = dot(r, r, D);  // in 8 lanes: a serial sum of squares cost ~0.8 us a 576-wide row
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) yp[t * D + d] = wp[d] * (r[d] * inv);
  }
  return y;
}

// Rotary embedding in place on the first `heads` heads of each row of qkv [T, C] (the query heads, then the key
// heads): x * cos + rotate_half(x) * sin with cos, sin [T, hd] (both halves equal, as the model builds them).
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t hd) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous(),
              "rope_: qkv must be float32 [T, C]");
  const int64_t T = qkv.size(0), C = qkv.size(1), half = hd / 2;
  TORCH_CHECK(heads * hd <= C && hd % 2 == 0, "rope_: ", heads, " heads of ", hd, " do not fit a row of ", C);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * hd && sin.numel() == T * hd,
              "rope_: cos and sin must be contiguous [T, head_dim]");
  float* p = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      float* x = p + t * C + h * hd;
      const float* ct = c + t * hd;
      const float* st = s + t * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x[i], b = x[i + half];
        x[i] = a * ct[i] - b * st[i];
        x[i + half] = b * ct[i + half] + a * st[i + half];
      }
    }
}

// silu(gate) * up for gu = [gate | up] of shape [T, 2I] -> [T, I].
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "silu_mul: input must be float32 [T, 2I]");
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  at::Tensor y = at::empty({T, I}, at::kFloat);
  const float* p = gu.data_ptr<float>();
  float* o = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    silu_times_n(p + t * 2 * I, p + t * 2 * I + I, o + t * I, I);
  return y;
}


// One decoding step of softmax attention with a KV cache, for one sequence or a batch of them (one per row of
// qkv): appends each row's key and value, then attends its query heads. attend_decode is the one-sequence call;
// attend_decode_batch runs every (row, head) of a batch in one parallel loop.
// Each of a batch's rows updates its own state in place: two rows given one buffer would write it twice.
void check_distinct(const std::vector<const void*>& buffers, const char* what, const char* noun) {
  for (size_t b = 0; b < buffers.size(); ++b)
    for (size_t j = 0; j < b; ++j)
      TORCH_CHECK(buffers[j] != buffers[b], what, ": rows ", j, " and ", b, " share a ", noun);
}

// A sequence's KV cache: keys and values [KV, capacity, hd], float32 or float16 (half the bytes to read each step;
// products and sums stay in float32).
struct KVCache {
  void* k;
  void* v;
  bool half;
  int64_t cap, n, lo;  // capacity in tokens; the slot this token goes into; the first slot it attends to
};

KVCache kv_cache(at::Tensor& kcache, at::Tensor& vcache, int64_t n, int64_t window, int64_t kv_heads, int64_t hd,
                 const char* what) {
  const auto dtype = kcache.scalar_type();
  TORCH_CHECK(kcache.dim() == 3 && kcache.is_contiguous() && vcache.is_contiguous() &&
              kcache.sizes() == vcache.sizes() && kcache.size(0) == kv_heads && kcache.size(2) == hd &&
              (dtype == at::kFloat || dtype == at::kHalf) && vcache.scalar_type() == dtype,
              what, ": caches must be float32 or float16 [KV, capacity, hd], keys and values alike");
  const int64_t cap = kcache.size(1);
  TORCH_CHECK(n >= 0 && n < cap, what, ": slot ", n, " is outside the cache capacity ", cap);
  return {kcache.data_ptr(), vcache.data_ptr(), dtype == at::kHalf, cap, n,
          window > 0 ? std::max<int64_t>(0, n + 1 - window) : 0};
}

// Row q (C floats: H query heads, then KV keys, then KV values) into slot c.n of its cache.
template <class T>
void kv_append(const float* q, const KVCache& c, int64_t heads, int64_t kv_heads, int64_t hd) {
  for (int64_t g = 0; g < kv_heads; ++g) {
    std::copy(q + (heads + g) * hd, q + (heads + g + 1) * hd, static_cast<T*>(c.k) + (g * c.cap + c.n) * hd);
    std::copy(q + (heads + kv_heads + g) * hd, q + (heads + kv_heads + g + 1) * hd,
              static_cast<T*>(c.v) + (g * c.cap + c.n) * hd);
  }
}

// Query head h of row q over slots [c.lo, c.n] of its KV group, into oh [hd]; p: scratch of at least c.n + 1 - c.lo.
template <class T>
void attend_head(const float* q, const KVCache& c, int64_t h, int64_t groups, int64_t hd, float scale, float* p,
                 float* oh) {
  const int64_t S = c.n + 1 - c.lo;
  const float* qh = q + h * hd;
  const T* K = static_cast<const T*>(c.k) + ((h / groups) * c.cap + c.lo) * hd;
  const T* V = static_cast<const T*>(c.v) + ((h / groups) * c.cap + c.lo) * hd;
  float m = -INFINITY;
  std::vector<float> wide(std::is_same_v<T, float> ? 0 : hd);  // a float16 key, widened: the same dot as float32's
  for (int64_t j = 0; j < S; ++j) {
    const float* kj;
    if constexpr (std::is_same_v<T, float>) {
      kj = K + j * hd;
    } else {
      std::copy(K + j * hd, K + (j + 1) * hd, wide.begin());
      kj = wide.data();
    }
    p[j] = dot(qh, kj, hd) * scale;
    m = std::max(m, p[j]);
  }
  float denom = 0.f;
  for (int64_t j = 0; j < S; ++j) {
    p[j] = std::exp(p[j] - m);
    denom += p[j];
  }
  std::fill(oh, oh + hd, 0.f);
  for (int64_t j = 0; j < S; ++j) {
    const float pj = p[j] / denom;
    const T* vj = V + j * hd;
    for (int64_t d = 0; d < hd; ++d) oh[d] += pj * static_cast<float>(vj[d]);
  }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// The sums of 16 vectors' lanes, as one vector (r[i] = the sum of v[i]): pairs, then quads, then across the four
// 128-bit lanes, 45 shuffles and adds for 16 sums instead of a reduction each.
inline __m512 hsum16(const __m512* v) {
  __m512 s[8], t[4];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s[2 * i]), b = _mm512_castps_pd(s[2 * i + 1]);
    t[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // t[i]: in each 128-bit lane, the partial sums of v[4i .. 4i+3]
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44), _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44), _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

constexpr int64_t kAttendBlock = 64;  // positions per block: its keys or values stay in L1 for every head of a group
constexpr int64_t kAttendGroups = 16;  // query heads per KV head that attend_group takes (more: attend_head)

// 16 cached keys or values as float32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The `groups` query heads h0 .. h0+groups-1 of row q that share KV head kvh, over slots [c.lo, c.n], into o
// [groups, hd] (NC = hd / 16 vectors a row): each block of keys and values is read once for all of them (attend_head
// reads them once per query head). p: scratch of at least groups * (c.n + 1 - c.lo).
template <int NC, class T>
void attend_group(const float* q, const KVCache& c, int64_t kvh, int64_t groups, float scale, float* p, float* o) {
  constexpr int64_t hd = NC * 16;
  const int64_t S = c.n + 1 - c.lo, h0 = kvh * groups;
  const T* K = static_cast<const T*>(c.k) + (kvh * c.cap + c.lo) * hd;
  const T* V = static_cast<const T*>(c.v) + (kvh * c.cap + c.lo) * hd;
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx[kAttendGroups];
  float inv[kAttendGroups];
  for (int64_t h = 0; h < groups; ++h) mx[h] = _mm512_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < S; j0 += kAttendBlock) {  // scores
    const int64_t j1 = std::min(S, j0 + kAttendBlock);
    for (int64_t h = 0; h < groups; ++h) {
      __m512 qh[NC];
      for (int k = 0; k < NC; ++k) qh[k] = _mm512_loadu_ps(q + (h0 + h) * hd + 16 * k);
      float* ph = p + h * S;
      for (int64_t j = j0; j < j1; j += 16) {
        const int nj = static_cast<int>(std::min<int64_t>(16, j1 - j));
        __m512 acc[16];
        for (int i = 0; i < 16; ++i) {
          acc[i] = _mm512_setzero_ps();
          if (i < nj)
            for (int k = 0; k < NC; ++k) acc[i] = _mm512_fmadd_ps(qh[k], load16(K + (j + i) * hd + 16 * k), acc[i]);
        }
        const __mmask16 live = static_cast<__mmask16>(nj == 16 ? 0xFFFF : (1u << nj) - 1);
        const __m512 r = _mm512_mul_ps(hsum16(acc), sc);
        _mm512_mask_storeu_ps(ph + j, live, r);
        mx[h] = _mm512_mask_max_ps(mx[h], live, r, mx[h]);  // (r first: a NaN score is kept)
      }
    }
  }
  for (int64_t h = 0; h < groups; ++h) {  // e^(score - max), and 1 / their sum
    float* ph = p + h * S;
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[h]));
    __m512 den = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j += 16) {
      const __mmask16 live = lanes16(S - j);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, ph + j), m));
      _mm512_mask_storeu_ps(ph + j, live, e);
      den = _mm512_add_ps(den, _mm512_maskz_mov_ps(live, e));
    }
    inv[h] = 1.f / _mm512_reduce_add_ps(den);
  }
  for (int64_t h = 0; h < groups; ++h)
    for (int k = 0; k < NC; ++k) _mm512_storeu_ps(o + h * hd + 16 * k, _mm512_setzero_ps());
  for (int64_t j0 = 0; j0 < S; j0 += kAttendBlock) {  // the values, weighted
    const int64_t j1 = std::min(S, j0 + kAttendBlock);
    for (int64_t h = 0; h < groups; ++h) {
      const float* ph = p + h * S;
      __m512 acc[NC];
      for (int k = 0; k < NC; ++k) acc[k] = _mm512_loadu_ps(o + h * hd + 16 * k);
      for (int64_t j = j0; j < j1; ++j) {
        const __m512 w = _mm512_set1_ps(ph[j]);
        for (int k = 0; k < NC; ++k) acc[k] = _mm512_fmadd_ps(w, load16(V + j * hd + 16 * k), acc[k]);
      }
      for (int k = 0; k < NC; ++k) _mm512_storeu_ps(o + h * hd + 16 * k, acc[k]);
    }
  }
  for (int64_t h = 0; h < groups; ++h) {
    const __m512 s = _mm512_set1_ps(inv[h]);
    for (int k = 0; k < NC; ++k)
      _mm512_storeu_ps(o + h * hd + 16 * k, _mm512_mul_ps(_mm512_loadu_ps(o + h * hd + 16 * k), s));
  }
}

// Whether attend_group takes heads of this width and groups of this many query heads (the others, and CPUs without
// AVX-512, take attend_head).
bool group_attention(int64_t hd, int64_t groups) { return (hd == 32 || hd == 64 || hd == 128) && groups <= kAttendGroups; }

template <class T>
void attend_kv_head(const float* q, const KVCache& c, int64_t kvh, int64_t groups, int64_t hd, float scale, float* p,
                    float* o) {
  if (hd == 32) attend_group<2, T>(q, c, kvh, groups, scale, p, o);
  else if (hd == 64) attend_group<4, T>(q, c, kvh, groups, scale, p, o);
  else attend_group<8, T>(q, c, kvh, groups, scale, p, o);
}
#else
bool group_attention(int64_t, int64_t) { return false; }
template <class T>
void attend_kv_head(const float*, const KVCache&, int64_t, int64_t, int64_t, float, float*, float*) {}
#endif

void check_qkv(const at::Tensor& qkv, int64_t rows, int64_t heads, int64_t kv_heads, int64_t hd, const char* what) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == rows && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() &&
              qkv.size(1) >= (heads + 2 * kv_heads) * hd, what, ": qkv must be float32 [", rows,
              ", (H + 2 KV) hd]");
  TORCH_CHECK(heads % kv_heads == 0, what, ": ", heads, " heads do not split into ", kv_heads, " groups");
}

// Row b of qkv [B, C] into slot caches[b].n of its cache (its key and value), then each of its query heads over
// slots [caches[b].lo, caches[b].n] of its KV group. Returns [B, heads * hd], every row computed as it is alone.
// The rows may be a batch (one cache each) or a prompt (one cache at consecutive slots: every row is written before
// any attends, and row b reads only slots up to its own).
at::Tensor attend_slots(const at::Tensor& qkv, const std::vector<KVCache>& caches, int64_t heads, int64_t kv_heads,
                        int64_t hd, double scale) {
  const int64_t B = static_cast<int64_t>(caches.size());
  int64_t work = 0, longest = 0;
  for (const auto& c : caches) {
    work += (c.n + 1 - c.lo) * hd * heads;
    longest = std::max(longest, c.n + 1 - c.lo);
  }
  const int64_t C = qkv.size(1), groups = heads / kv_heads;
  const bool half = caches[0].half;
  for (const auto& c : caches) TORCH_CHECK(c.half == half, "attention: every cache of one call must be of one dtype");
  const float* q = qkv.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    if (half) kv_append<c10::Half>(q + b * C, caches[b], heads, kv_heads, hd);
    else kv_append<float>(q + b * C, caches[b], heads, kv_heads, hd);
  }
  at::Tensor out = at::empty({B, heads * hd}, at::kFloat);
  float* o = out.data_ptr<float>();
  // one (row, KV head) per task where attend_group takes them (its keys and values read once for its query heads),
  // else one (row, head); little work in all (short caches, few rows): one thread, no fork/join
  const bool grouped = group_attention(hd, groups);
  const int64_t units = grouped ? kv_heads : heads, per_unit = grouped ? groups : 1;
  const int64_t grain = work >= 16384 * heads ? 1 : B * units;
  at::parallel_for(0, B * units, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(per_unit * longest);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / units, u = t % units;
      float* ou = o + (b * heads + u * per_unit) * hd;
      const float sc = static_cast<float>(scale);
      if (grouped && half) attend_kv_head<c10::Half>(q + b * C, caches[b], u, groups, hd, sc, p.data(), ou);
      else if (grouped) attend_kv_head<float>(q + b * C, caches[b], u, groups, hd, sc, p.data(), ou);
      else if (half) attend_head<c10::Half>(q + b * C, caches[b], u, groups, hd, sc, p.data(), ou);
      else attend_head<float>(q + b * C, caches[b], u, groups, hd, sc, p.data(), ou);
    }
  });
  return out;
}

// Rows [starts[b], starts[b + 1]) continue sequence b, in order: B + 1 offsets from 0, none decreasing. Checked.
int64_t segment_rows(const std::vector<int64_t>& starts, int64_t B, const char* what) {
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == B + 1 && starts[0] == 0, what,
              ": starts must hold one offset per sequence and the end, from 0");
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(starts[b] <= starts[b + 1], what, ": starts must not decrease (sequence ", b, ")");
  return starts[B];
}

// Rows [starts[b], starts[b + 1]) of qkv [R, C] continue sequence b (kcaches[b] / vcaches[b] [KV, capacity, hd]),
// its first row into slot ns[b], the next into ns[b] + 1, ...: each row's key and value are written, then each of its
// query heads attends slots [slot + 1 - window, slot] (all of 0..slot when window <= 0) of its KV group, exactly as
// decoding the rows one token at a time would. One call for any mix: a decoding step (one row per sequence), a
// prompt chunk (one sequence), several prompts, or prompts beside decoding rows. Returns [R, heads * hd].
at::Tensor attend_segments_impl(const at::Tensor& qkv, std::vector<at::Tensor>& kcaches,
                                std::vector<at::Tensor>& vcaches, const std::vector<int64_t>& ns,
                                const std::vector<int64_t>& starts, int64_t heads, int64_t kv_heads, int64_t hd,
                                double scale, int64_t window, const char* what) {
  const int64_t B = static_cast<int64_t>(ns.size());
  TORCH_CHECK(B > 0 && static_cast<int64_t>(kcaches.size()) == B && static_cast<int64_t>(vcaches.size()) == B,
              what, ": one key cache, value cache and first slot per sequence");
  const int64_t R = segment_rows(starts, B, what);
  TORCH_CHECK(R > 0, what, ": no rows");
  check_qkv(qkv, R, heads, kv_heads, hd, what);
  std::vector<KVCache> caches;
  std::vector<const void*> buffers;
  for (int64_t b = 0; b < B; ++b) {
    buffers.push_back(kcaches[b].data_ptr());
    for (int64_t t = 0; t < starts[b + 1] - starts[b]; ++t)
      caches.push_back(kv_cache(kcaches[b], vcaches[b], ns[b] + t, window, kv_heads, hd, what));
  }
  check_distinct(buffers, what, "cache");
  return attend_slots(qkv, caches, heads, kv_heads, hd, scale);
}

at::Tensor attend_segments(const at::Tensor& qkv, std::vector<at::Tensor> kcaches, std::vector<at::Tensor> vcaches,
                           const std::vector<int64_t>& ns, const std::vector<int64_t>& starts, int64_t heads,
                           int64_t kv_heads, int64_t hd, double scale, int64_t window) {
  return attend_segments_impl(qkv, kcaches, vcaches, ns, starts, heads, kv_heads, hd, scale, window,
                              "attend_segments");
}

// One row per sequence (attend_segments' decoding step).
at::Tensor attend_rows(const at::Tensor& qkv, std::vector<at::Tensor> kcaches, std::vector<at::Tensor> vcaches,
                       const std::vector<int64_t>& ns, int64_t heads, int64_t kv_heads, int64_t hd, double scale,
                       int64_t window, const char* what) {
  std::vector<int64_t> starts(ns.size() + 1);
  std::iota(starts.begin(), starts.end(), int64_t{0});
  return attend_segments_impl(qkv, kcaches, vcaches, ns, starts, heads, kv_heads, hd, scale, window, what);
}

// A prompt chunk of one sequence, causally: row t of qkv [T, C] goes into slot n + t of kcache / vcache and attends
// slots [n + t + 1 - window, n + t] (all of 0..n+t when window <= 0), exactly as decoding it token by token would.
// Returns [T, heads * hd]. (The reference, and the path without these kernels, is torch's SDPA with a causal mask.)
at::Tensor attend_prompt(const at::Tensor& qkv, at::Tensor& kcache, at::Tensor& vcache, int64_t n, int64_t heads,
                         int64_t kv_heads, int64_t hd, double scale, int64_t window) {
  std::vector<at::Tensor> ks{kcache}, vs{vcache};
  return attend_segments_impl(qkv, ks, vs, {n}, {0, qkv.size(0)}, heads, kv_heads, hd, scale, window,
                              "attend_prompt");
}

// One decoding step of softmax attention with a KV cache: writes this token's key and value (rows of qkv [1, C]
// after the query heads) into slot n of kcache / vcache [KV, capacity, hd], then attends each query head over
// slots [n + 1 - window, n] (all of 0..n when window <= 0) of its KV group. Returns [1, heads * hd].
at::Tensor attend_decode(const at::Tensor& qkv, at::Tensor& kcache, at::Tensor& vcache, int64_t n, int64_t heads,
                         int64_t kv_heads, int64_t hd, double scale, int64_t window) {
  return attend_rows(qkv, {kcache}, {vcache}, {n}, heads, kv_heads, hd, scale, window, "attend_decode");
}

at::Tensor attend_decode_batch(const at::Tensor& qkv, std::vector<at::Tensor> kcaches, std::vector<at::Tensor> vcaches,
                               const std::vector<int64_t>& ns, int64_t heads, int64_t kv_heads, int64_t hd,
                               double scale, int64_t window) {
  return attend_rows(qkv, kcaches, vcaches, ns, heads, kv_heads, hd, scale, window, "attend_decode_batch");
}


// One head of linear attention over rows r = 0 .. n-1 of one sequence (the pointers at row 0, advanced by their
// strides per row), on its state kv [F, D] and normaliser z [F]: for each row,
//   kv = decay * kv + fk^T v,  z = decay * z + fk,  out = (fq kv) / (fq . z + eps).
// The state is read and written once per two rows (each row's update is the same arithmetic as when it comes alone,
// so decoding a prompt's tokens one by one gives the same bits). The normaliser is kept apart from kv (the ops
// functions append it to v as a column of ones, [F, D+1]): rows of D floats stay aligned to cache lines, where the
// D+1 columns made most loads and stores cross two (a 60-token prompt of a 20-layer all-linear model of SmolLM2's
// width: these calls 4.3 -> ~2 ms). NV vectors of 16 hold D columns.
#if defined(__AVX512F__)
template <int NV>
void linear_head_simd(float* S, float* Z, int64_t Fd, int64_t D, const float* dec, const float* q, int64_t qs,
                      const float* k, int64_t ks, const float* v, int64_t vs, float* o, int64_t os, int64_t n,
                      float eps) {
  __mmask16 vm[NV];  // the columns of each vector (D)
  for (int c = 0; c < NV; ++c) vm[c] = lanes16(D - 16 * c);
  const __m512 av = _mm512_set1_ps(dec ? *dec : 1.f);
  auto load_v = [&](const float* vr, __m512* out) {
    for (int c = 0; c < NV; ++c) out[c] = _mm512_maskz_loadu_ps(vm[c], vr + 16 * c);
  };
  // A row of the state, asking for the rows 4 KiB ahead (the next heads' and sequences' states follow): at several
  // sequences the states no longer fit the caches, and without it the hardware prefetchers left a decoding step
  // waiting on them (8 sequences of a 20-layer all-linear model of SmolLM2's width: these calls 2.9 -> 1.1 ms).
  auto load_row = [&](const float* sr, __m512* row) __attribute__((always_inline)) {
    for (int c = 0; c < NV; ++c) {
      __builtin_prefetch(sr + 16 * c + kPrefetchBytes / 4, 1);
      row[c] = _mm512_maskz_loadu_ps(vm[c], sr + 16 * c);
    }
  };
  auto update = [&](__m512* row, const __m512* vr, float kf, float qf, __m512* acc) __attribute__((always_inline)) {
    const __m512 kb = _mm512_set1_ps(kf), qb = _mm512_set1_ps(qf);
    for (int c = 0; c < NV; ++c) {
      row[c] = _mm512_fmadd_ps(kb, vr[c], dec ? _mm512_mul_ps(av, row[c]) : row[c]);
      acc[c] = _mm512_fmadd_ps(qb, row[c], acc[c]);
    }
  };
  // z's update and fq . z for `rows` (1 or 2) rows, 16 features a vector
  auto normaliser = [&](const float* const* kr, const float* const* qr, int rows, float* den) {
    __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t f = 0; f < Fd; f += 16) {
      const __mmask16 m = lanes16(Fd - f);
      __m512 z = _mm512_maskz_loadu_ps(m, Z + f);
      for (int i = 0; i < rows; ++i) {
        z = _mm512_add_ps(dec ? _mm512_mul_ps(av, z) : z, _mm512_maskz_loadu_ps(m, kr[i] + f));
        s[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qr[i] + f), z, s[i]);
      }
      _mm512_mask_storeu_ps(Z + f, m, z);
    }
    for (int i = 0; i < rows; ++i) den[i] = _mm512_reduce_add_ps(s[i]) + eps;
  };
  auto finish = [&](const __m512* acc, float den, float* out) {
    const __m512 inv = _mm512_set1_ps(1.f / den);
    for (int c = 0; c < NV; ++c) _mm512_mask_storeu_ps(out + 16 * c, vm[c], _mm512_mul_ps(acc[c], inv));
  };
  int64_t r = 0;
  for (; NV <= 5 && r + 1 < n; r += 2) {  // two rows a pass (more vectors than registers beyond 5)
    __m512 va[NV], vb[NV], aa[NV], ab[NV], row[NV];
    load_v(v + r * vs, va);
    load_v(v + (r + 1) * vs, vb);
    for (int c = 0; c < NV; ++c) aa[c] = ab[c] = _mm512_setzero_ps();
    const float *qa = q + r * qs, *qb = qa + qs, *ka = k + r * ks, *kb = ka + ks;
    const float* kr[2] = {ka, kb};
    const float* qr[2] = {qa, qb};
    float den[2];
    normaliser(kr, qr, 2, den);
    for (int64_t f = 0; f < Fd; ++f) {
      float* sr = S + f * D;
      load_row(sr, row);
      update(row, va, ka[f], qa[f], aa);
      update(row, vb, kb[f], qb[f], ab);
      for (int c = 0; c < NV; ++c) _mm512_mask_storeu_ps(sr + 16 * c, vm[c], row[c]);
    }
    finish(aa, den[0], o + r * os);
    finish(ab, den[1], o + (r + 1) * os);
  }
  for (; r < n; ++r) {
    __m512 va[NV], aa[NV], row[NV];
    load_v(v + r * vs, va);
    for (int c = 0; c < NV; ++c) aa[c] = _mm512_setzero_ps();
    const float *qa = q + r * qs, *ka = k + r * ks;
    float den;
    normaliser(&ka, &qa, 1, &den);
    for (int64_t f = 0; f < Fd; ++f) {
      float* sr = S + f * D;
      load_row(sr, row);
      update(row, va, ka[f], qa[f], aa);
      for (int c = 0; c < NV; ++c) _mm512_mask_storeu_ps(sr + 16 * c, vm[c], row[c]);
    }
    finish(aa, den, o + r * os);
  }
}

// linear_head_simd for D <= 16 * 9 columns (else false: the caller's plain loop).
bool linear_head(float* S, float* Z, int64_t Fd, int64_t D, const float* dec, const float* q, int64_t qs,
                 const float* k, int64_t ks, const float* v, int64_t vs, float* o, int64_t os, int64_t n, float eps) {
  switch ((D + 15) / 16) {
#define CMX_LINEAR_HEAD(NV) \
  case NV: linear_head_simd<NV>(S, Z, Fd, D, dec, q, qs, k, ks, v, vs, o, os, n, eps); return true;
    CMX_LINEAR_HEAD(1) CMX_LINEAR_HEAD(2) CMX_LINEAR_HEAD(3) CMX_LINEAR_HEAD(4) CMX_LINEAR_HEAD(5)
    CMX_LINEAR_HEAD(6) CMX_LINEAR_HEAD(7) CMX_LINEAR_HEAD(8) CMX_LINEAR_HEAD(9)
#undef CMX_LINEAR_HEAD
    default: return false;
  }
}
#else
bool linear_head(float*, float*, int64_t, int64_t, const float*, const float*, int64_t, const float*, int64_t,
                 const float*, int64_t, float*, int64_t, int64_t, float) { return false; }
#endif

// Linear attention on fixed-size states, in place, token by token: for each row r of sequence b and each head h
// (KV group g = h / (H/KV)),
//   kv[h] = decay[h] kv[h] + fk[r, g]^T v[r, g],  z[h] = decay[h] z[h] + fk[r, g],
//   out[r, h] = (fq[r, h] kv[h]) / (fq[r, h] . z[h] + eps).
// kvs[b] [H, F, D] and zs[b] [H, F] (rows starts[b] .. starts[b+1]-1 continue them, in order), fq [R, H, F],
// fk [R, KV, F], v [R, KV, D], decay [H] multiplicative or empty for none; returns [R, H, D]. One decoding step of B
// sequences has one row each; a prompt chunk is one sequence's T rows, each computed exactly as decoding it would.
// Every (sequence, head) is a task of one parallel loop and walks its rows with the head's state in cache (the
// reference, codexmini.ops.linear_attn's chunked form on [kv | z] = its state [F, D+1], makes several passes and
// allocates each).
at::Tensor linear_rows(std::vector<at::Tensor> kvs, std::vector<at::Tensor> zs, const std::vector<int64_t>& starts,
                       const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v, const at::Tensor& decay,
                       double eps, const char* what) {
  const int64_t B = static_cast<int64_t>(kvs.size());
  TORCH_CHECK(B > 0 && zs.size() == kvs.size(), what, ": one state and one normaliser per sequence");
  const int64_t R = segment_rows(starts, B, what);
  for (const auto& st : kvs)
    TORCH_CHECK(st.dim() == 3 && st.is_contiguous() && st.scalar_type() == at::kFloat && st.sizes() == kvs[0].sizes(),
                what, ": states must be float32 [H, F, D], all of one shape");
  const int64_t H = kvs[0].size(0), Fd = kvs[0].size(1), D = kvs[0].size(2);
  for (const auto& z : zs)
    TORCH_CHECK(z.is_contiguous() && z.scalar_type() == at::kFloat && z.sizes() == at::IntArrayRef({H, Fd}), what,
                ": normalisers must be float32 [H, F] = [", H, ", ", Fd, "]");
  TORCH_CHECK(R > 0, what, ": no rows");
  TORCH_CHECK(fq.is_contiguous() && fq.scalar_type() == at::kFloat && fq.numel() == R * H * Fd,
              what, ": fq must be float32 [H, F] per row");
  TORCH_CHECK(fk.is_contiguous() && v.is_contiguous() && fk.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat && fk.numel() % (R * Fd) == 0,
              what, ": fk / v must be float32 [KV, F] / [KV, D] per row");
  const int64_t KV = fk.numel() / (R * Fd);
  TORCH_CHECK(KV > 0 && H % KV == 0 && v.numel() == R * KV * D, what, ": ", KV, " key heads do not match ", H,
              " heads and v of ", v.numel() / R, " values per row");
  TORCH_CHECK(decay.numel() == 0 || (decay.numel() == H && decay.is_contiguous() && decay.scalar_type() == at::kFloat),
              what, ": decay must be empty or float32 [H]");
  const int64_t groups = H / KV;
  std::vector<float*> S, Z;
  for (auto& st : kvs) S.push_back(st.data_ptr<float>());
  for (auto& z : zs) Z.push_back(z.data_ptr<float>());
  check_distinct(std::vector<const void*>(S.begin(), S.end()), what, "state");
  check_distinct(std::vector<const void*>(Z.begin(), Z.end()), what, "normaliser");
  const float* q = fq.data_ptr<float>();
  const float* k = fk.data_ptr<float>();
  const float* vv = v.data_ptr<float>();
  const float* dec = decay.numel() ? decay.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({R, H, D}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * H, R * Fd * D >= 4096 ? 1 : B * H, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, r0 = starts[b], hg = h / groups;
      float *Sh = S[b] + h * Fd * D, *Zh = Z[b] + h * Fd;
      if (linear_head(Sh, Zh, Fd, D, dec ? dec + h : nullptr, q + (r0 * H + h) * Fd, H * Fd, k + (r0 * KV + hg) * Fd,
                      KV * Fd, vv + (r0 * KV + hg) * D, KV * D, o + (r0 * H + h) * D, H * D, starts[b + 1] - r0,
                      static_cast<float>(eps)))
        continue;
      const float a = dec ? dec[h] : 1.f;
      for (int64_t r = r0; r < starts[b + 1]; ++r) {
        const int64_t g = r * KV + hg, rh = r * H + h;
        const float *vr = vv + g * D, *kr = k + g * Fd, *qr = q + rh * Fd;
        float den = 0.f;
        for (int64_t f = 0; f < Fd; ++f) {
          Zh[f] = a * Zh[f] + kr[f];
          den += qr[f] * Zh[f];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t f = 0; f < Fd; ++f) {
          float* row = Sh + f * D;
          for (int64_t d = 0; d < D; ++d) {
            row[d] = a * row[d] + kr[f] * vr[d];
            acc[d] += qr[f] * row[d];
          }
        }
        const float inv = 1.f / (den + static_cast<float>(eps));
        for (int64_t d = 0; d < D; ++d) o[rh * D + d] = acc[d] * inv;
      }
    }
  });
  return out;
}

at::Tensor linear_decode_(at::Tensor& kv, at::Tensor& z, const at::Tensor& fq, const at::Tensor& fk,
                          const at::Tensor& v, const at::Tensor& decay, double eps) {
  TORCH_CHECK(kv.dim() == 3, "linear_decode_: state must be float32 [H, F, D]");
  return linear_rows({kv}, {z}, {0, 1}, fq, fk, v, decay, eps, "linear_decode_")[0];
}

// linear_decode_ for several sequences' runs of tokens (rows starts[b] .. starts[b+1]-1 continue kvs[b] / zs[b];
// fq [R, H, F], fk [R, KV, F], v [R, KV, D]), in one call: prompt chunks, computed as decoding them token by token.
at::Tensor linear_segments_(std::vector<at::Tensor> kvs, std::vector<at::Tensor> zs, const std::vector<int64_t>& starts,
                            const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v, const at::Tensor& decay,
                            double eps) {
  return linear_rows(kvs, zs, starts, fq, fk, v, decay, eps, "linear_segments_");
}

// Hedgehog's map of one head of one token (x [D], w [D, Fh], NF = Fh / 16 vectors of the projection kept in
// registers) into out [2 Fh]: [softmax(x w), softmax(-x w)], with exp16 (a scalar exp per feature was most of a
// prompt's feature-map time).
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <int NF>
void hedgehog_simd(const float* x, const float* w, int64_t D, float* out) {
  __m512 proj[NF];
  for (int c = 0; c < NF; ++c) proj[c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 xd = _mm512_set1_ps(x[d]);
    for (int c = 0; c < NF; ++c) proj[c] = _mm512_fmadd_ps(xd, _mm512_loadu_ps(w + d * NF * 16 + 16 * c), proj[c]);
  }
  __m512 mx = proj[0], mn = proj[0];
  for (int c = 1; c < NF; ++c) {
    mx = _mm512_max_ps(mx, proj[c]);
    mn = _mm512_min_ps(mn, proj[c]);
  }
  const __m512 hi = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), lo = _mm512_set1_ps(_mm512_reduce_min_ps(mn));
  __m512 sp = _mm512_setzero_ps(), sn = _mm512_setzero_ps(), ep[NF], en[NF];
  for (int c = 0; c < NF; ++c) {
    ep[c] = exp16(_mm512_sub_ps(proj[c], hi));
    en[c] = exp16(_mm512_sub_ps(lo, proj[c]));
    sp = _mm512_add_ps(sp, ep[c]);
    sn = _mm512_add_ps(sn, en[c]);
  }
  const __m512 ip = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sp)), in = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sn));
  for (int c = 0; c < NF; ++c) {
    _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(ep[c], ip));
    _mm512_storeu_ps(out + NF * 16 + 16 * c, _mm512_mul_ps(en[c], in));
  }
}

bool hedgehog_row(const float* x, const float* w, int64_t D, int64_t Fh, float* out) {
  switch (Fh) {
    case 16: hedgehog_simd<1>(x, w, D, out); return true;
    case 32: hedgehog_simd<2>(x, w, D, out); return true;
    case 64: hedgehog_simd<4>(x, w, D, out); return true;
    case 128: hedgehog_simd<8>(x, w, D, out); return true;
    default: return false;
  }
}
#else
bool hedgehog_row(const float*, const float*, int64_t, int64_t, float*) { return false; }
#endif

// Hedgehog feature map of one token: proj = x[h] w[h] (x [H, D], w [H, D, Fh]) -> [softmax(proj), softmax(-proj)];
// or of several tokens, x [R, D] with R a multiple of H (row r is head r % H of token r / H), out [R, 2 Fh].
at::Tensor hedgehog(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == at::kFloat &&
              w.scalar_type() == at::kFloat && w.dim() == 3 && x.numel() > 0 &&
              x.numel() % (w.size(0) * w.size(1)) == 0, "hedgehog: x must be float32 [H, D] (per token), w [H, D, Fh]");
  const int64_t H = w.size(0), D = w.size(1), Fh = w.size(2), R = x.numel() / D;
  at::Tensor out = at::empty({R, 2 * Fh}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // rows in parallel when there are many (a prompt's tokens, a batch's heads; one token's heads stay on one
  // thread: at least 64K multiply-adds a task)
  at::parallel_for(0, R, std::max<int64_t>(1, 65536 / std::max<int64_t>(D * Fh, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<float> proj(Fh);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H;
      if (hedgehog_row(xp + r * D, wp + h * D * Fh, D, Fh, o + r * 2 * Fh)) continue;
      std::fill(proj.begin(), proj.end(), 0.f);
      for (int64_t d = 0; d < D; ++d) {
        const float xd = xp[r * D + d];
        const float* wr = wp + (h * D + d) * Fh;
        for (int64_t f = 0; f < Fh; ++f) proj[f] += xd * wr[f];
      }
      float mx = -INFINITY, mn = INFINITY;
      for (int64_t f = 0; f < Fh; ++f) { mx = std::max(mx, proj[f]); mn = std::min(mn, proj[f]); }
      float sp = 0.f, sn = 0.f;
      float* op = o + r * 2 * Fh;
      for (int64_t f = 0; f < Fh; ++f) {
        op[f] = std::exp(proj[f] - mx);
        op[Fh + f] = std::exp(mn - proj[f]);
        sp += op[f];
        sn += op[Fh + f];
      }
      for (int64_t f = 0; f < Fh; ++f) { op[f] /= sp; op[Fh + f] /= sn; }
    }
  });
  return out;
}

// One sequence's buffers for a hybrid step, checked: the linear state as the kernels hold it (kv [H, F, D] and its
// normaliser z [H, F], as linear_rows'), the window ring (wk [H, w, D], wfk [H, w, F], wv1 [H, w, D+1]) and meta
// [count, oldest].
struct HybridSeq {
  float *S, *Z, *K, *FK, *VV;
  int64_t* meta;
  int64_t count, oldest;
};

HybridSeq hybrid_seq(at::Tensor& kv, at::Tensor& z, at::Tensor& wk, at::Tensor& wfk, at::Tensor& wv1, at::Tensor& meta,
                     const at::Tensor& like_kv, const at::Tensor& like_wk, const char* what) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&kv, &z, &wk, &wfk, &wv1})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, what, ": tensors must be contiguous float32");
  TORCH_CHECK(meta.numel() == 2 && meta.scalar_type() == at::kLong && meta.is_contiguous(),
              what, ": meta must be int64 [count, oldest]");
  const int64_t H = like_kv.size(0), Fd = like_kv.size(1), D = like_kv.size(2), W = like_wk.size(1);
  TORCH_CHECK(kv.sizes() == like_kv.sizes() && z.sizes() == at::IntArrayRef({H, Fd}), what,
              ": states must be [H, F, D] with normalisers [H, F], every sequence's of one shape");
  TORCH_CHECK(wk.sizes() == at::IntArrayRef({H, W, D}) && wfk.sizes() == at::IntArrayRef({H, W, Fd}) &&
              wv1.sizes() == at::IntArrayRef({H, W, D + 1}),
              what, ": window buffers must be [H, w, D|F|D+1], every sequence's of one shape");
  int64_t* mp = meta.data_ptr<int64_t>();
  TORCH_CHECK(mp[0] >= 0 && mp[0] <= W && mp[1] >= 0 && mp[1] < W, what, ": bad window meta");
  return {kv.data_ptr<float>(), z.data_ptr<float>(), wk.data_ptr<float>(), wfk.data_ptr<float>(),
          wv1.data_ptr<float>(), mp, mp[0], mp[1]};
}

// One (sequence, head) of a hybrid layer over its rows (see hybrid_rows), in plain C++: the head's linear state
// S [F, D] / Z [F], its ring K [w, D], FK [w, F], VV [w, D+1]; row r's q / fq at q + r * qs, fq + r * fqs, its new
// key, features and value at k + r * ks, fk + r * fks, v + r * vs; out at o + r * os.
struct HybridHead {
  float *S, *Z, *K, *FK, *VV;
  int64_t Fd, D, W, count, oldest;
  float decay;  // 1 for none
  float* scratch;  // hybrid_scratch(D, W) floats, the task's own
};

// Floats of scratch a hybrid head's rows need: the window's scores (padded to whole vectors) and two rows of D.
inline int64_t hybrid_scratch(int64_t D, int64_t W) { return (W + 15) / 16 * 16 + 2 * D; }

void hybrid_head_plain(HybridHead& h, const float* q, int64_t qs, const float* fq, int64_t fqs, const float* k,
                       int64_t ks, const float* fk, int64_t fks, const float* v, int64_t vs, float* o, int64_t os,
                       int64_t n, float scale, float eps) {
  const int64_t Fd = h.Fd, D = h.D, W = h.W, V1 = D + 1;
  float *a = h.scratch, *lin = a + (W + 15) / 16 * 16, *num = lin + D;
  for (int64_t r = 0; r < n; ++r) {
    const float *qr = q + r * qs, *fqr = fq + r * fqs;
    const bool full = h.count == W;
    const int64_t slot = full ? h.oldest : (h.oldest + h.count) % W, m = full ? W : h.count + 1;
    const float* fold = h.FK + slot * Fd;  // the leaving key's features (when full)
    const float* vold = h.VV + slot * V1;
    float lin_den = 0.f;
    for (int64_t f = 0; f < Fd; ++f) {
      h.Z[f] = h.decay * h.Z[f] + (full ? fold[f] : 0.f);
      lin_den += fqr[f] * h.Z[f];
    }
    std::fill(lin, lin + D, 0.f);
    for (int64_t f = 0; f < Fd; ++f) {
      float* row = h.S + f * D;
      const float kf = full ? fold[f] : 0.f;
      for (int64_t d = 0; d < D; ++d) {
        row[d] = h.decay * row[d] + kf * vold[d];
        lin[d] += fqr[f] * row[d];
      }
    }
    // the new token takes the slot
    std::copy(k + r * ks, k + r * ks + D, h.K + slot * D);
    std::copy(fk + r * fks, fk + r * fks + Fd, h.FK + slot * Fd);
    std::copy(v + r * vs, v + r * vs + D, h.VV + slot * V1);
    h.VV[slot * V1 + D] = 1.f;
    // softmax over the window (slots in any order: the sum does not care)
    float mx = -INFINITY;
    for (int64_t j = 0; j < m; ++j) {
      const int64_t sl = full ? j : (h.oldest + j) % W;
      a[j] = dot(qr, h.K + sl * D, D) * scale;
      mx = std::max(mx, a[j]);
    }
    float den = 0.f;
    std::fill(num, num + D, 0.f);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t sl = full ? j : (h.oldest + j) % W;
      const float e = std::exp(a[j] - mx);
      den += e;
      const float* vj = h.VV + sl * V1;
      for (int64_t d = 0; d < D; ++d) num[d] += e * vj[d];
    }
    const float inv = 1.f / (den + lin_den + eps);
    for (int64_t d = 0; d < D; ++d) o[r * os + d] = (num[d] + lin[d]) * inv;
    if (full) h.oldest = (h.oldest + 1) % W;
    else ++h.count;
  }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// hybrid_head_plain in AVX-512, NV vectors of 16 holding D columns: the state's rows prefetched and updated as
// linear_head_simd's, the window's scores one reduction per slot, their exponentials 16 at a time (exp16).
template <int NV>
void hybrid_head_simd(HybridHead& h, const float* q, int64_t qs, const float* fq, int64_t fqs, const float* k,
                      int64_t ks, const float* fk, int64_t fks, const float* v, int64_t vs, float* o, int64_t os,
                      int64_t n, float scale, float eps) {
  const int64_t Fd = h.Fd, D = h.D, W = h.W, V1 = D + 1;
  __mmask16 vm[NV];
  for (int c = 0; c < NV; ++c) vm[c] = lanes16(D - 16 * c);
  const __m512 av = _mm512_set1_ps(h.decay);
  const bool decays = h.decay != 1.f;
  float* a = h.scratch;  // the window's scores, then their exponentials
  for (int64_t r = 0; r < n; ++r) {
    const float *qr = q + r * qs, *fqr = fq + r * fqs;
    const bool full = h.count == W;
    const int64_t slot = full ? h.oldest : (h.oldest + h.count) % W, m = full ? W : h.count + 1;
    const float* fold = h.FK + slot * Fd;
    __m512 vo[NV], lin[NV];
    for (int c = 0; c < NV; ++c) {
      vo[c] = full ? _mm512_maskz_loadu_ps(vm[c], h.VV + slot * V1 + 16 * c) : _mm512_setzero_ps();
      lin[c] = _mm512_setzero_ps();
    }
    __m512 zs = _mm512_setzero_ps();
    for (int64_t f = 0; f < Fd; f += 16) {
      const __mmask16 mk = lanes16(Fd - f);
      __m512 z = _mm512_maskz_loadu_ps(mk, h.Z + f);
      if (decays) z = _mm512_mul_ps(av, z);
      if (full) z = _mm512_add_ps(z, _mm512_maskz_loadu_ps(mk, fold + f));
      zs = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, fqr + f), z, zs);
      _mm512_mask_storeu_ps(h.Z + f, mk, z);
    }
    const float lin_den = _mm512_reduce_add_ps(zs);
    for (int64_t f = 0; f < Fd; ++f) {
      float* sr = h.S + f * D;
      const __m512 kb = _mm512_set1_ps(full ? fold[f] : 0.f), qb = _mm512_set1_ps(fqr[f]);
      for (int c = 0; c < NV; ++c) {
        __builtin_prefetch(sr + 16 * c + kPrefetchBytes / 4, 1);
        __m512 row = _mm512_maskz_loadu_ps(vm[c], sr + 16 * c);
        row = _mm512_fmadd_ps(kb, vo[c], decays ? _mm512_mul_ps(av, row) : row);
        lin[c] = _mm512_fmadd_ps(qb, row, lin[c]);
        _mm512_mask_storeu_ps(sr + 16 * c, vm[c], row);
      }
    }
    std::copy(k + r * ks, k + r * ks + D, h.K + slot * D);
    std::copy(fk + r * fks, fk + r * fks + Fd, h.FK + slot * Fd);
    std::copy(v + r * vs, v + r * vs + D, h.VV + slot * V1);
    h.VV[slot * V1 + D] = 1.f;
    __m512 qv[NV];
    for (int c = 0; c < NV; ++c) qv[c] = _mm512_maskz_loadu_ps(vm[c], qr + 16 * c);
    float mx = -INFINITY;
    for (int64_t j = 0; j < m; ++j) {
      const float* kj = h.K + (full ? j : (h.oldest + j) % W) * D;
      for (int c = 0; c < NV; ++c) __builtin_prefetch(kj + 16 * c + kPrefetchBytes / 4);  // as the state's rows
      __m512 s = _mm512_setzero_ps();
      for (int c = 0; c < NV; ++c) s = _mm512_fmadd_ps(qv[c], _mm512_maskz_loadu_ps(vm[c], kj + 16 * c), s);
      a[j] = _mm512_reduce_add_ps(s) * scale;
      mx = std::max(mx, a[j]);
    }
    __m512 dv = _mm512_setzero_ps();
    for (int64_t j = 0; j < m; j += 16) {
      const __mmask16 live = lanes16(m - j);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, a + j),
                                                                       _mm512_set1_ps(mx))));
      _mm512_mask_storeu_ps(a + j, live, e);
      dv = _mm512_add_ps(dv, e);
    }
    const float den = _mm512_reduce_add_ps(dv);
    for (int64_t j = 0; j < m; ++j) {
      const float* vj = h.VV + (full ? j : (h.oldest + j) % W) * V1;
      for (int c = 0; c < NV; ++c) __builtin_prefetch(vj + 16 * c + kPrefetchBytes / 4);
      const __m512 e = _mm512_set1_ps(a[j]);
      for (int c = 0; c < NV; ++c) lin[c] = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(vm[c], vj + 16 * c), lin[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / (den + lin_den + eps));
    for (int c = 0; c < NV; ++c) _mm512_mask_storeu_ps(o + r * os + 16 * c, vm[c], _mm512_mul_ps(lin[c], inv));
    if (full) h.oldest = (h.oldest + 1) % W;
    else ++h.count;
  }
}
#endif

void hybrid_head(HybridHead& h, const float* q, int64_t qs, const float* fq, int64_t fqs, const float* k, int64_t ks,
                 const float* fk, int64_t fks, const float* v, int64_t vs, float* o, int64_t os, int64_t n,
                 float scale, float eps) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  switch ((h.D + 15) / 16) {
#define CMX_HYBRID_HEAD(NV) \
  case NV: return hybrid_head_simd<NV>(h, q, qs, fq, fqs, k, ks, fk, fks, v, vs, o, os, n, scale, eps);
    CMX_HYBRID_HEAD(1) CMX_HYBRID_HEAD(2) CMX_HYBRID_HEAD(3) CMX_HYBRID_HEAD(4) CMX_HYBRID_HEAD(5)
    CMX_HYBRID_HEAD(6) CMX_HYBRID_HEAD(7) CMX_HYBRID_HEAD(8)
#undef CMX_HYBRID_HEAD
    default: break;
  }
#endif
  hybrid_head_plain(h, q, qs, fq, fqs, k, ks, fk, fks, v, vs, o, os, n, scale, eps);
}

// A hybrid layer token by token: softmax attention over a sliding window of the last `w` keys plus linear attention
// over every key that has left it, for B sequences, rows starts[b] .. starts[b+1]-1 continuing sequence b in order
// (one row each for a decoding step; a prompt chunk's T rows, each computed exactly as decoding it would), in one
// parallel loop over (sequence, head). The window is a ring buffer in place: wk [H, w, D], wfk [H, w, F],
// wv1 [H, w, D+1] (keys, their features and [value, 1], per query head), with meta = [count, oldest slot] (int64,
// updated in place). The linear state is kvs[b] [H, F, D] and zs[b] [H, F] (linear_rows' form). When the window is
// full its oldest key leaves into the state (kv = decay * kv + fk_old^T v_old, z = decay * z + fk_old; decay
// applied every step); the new key takes a slot; then
//   out[h] = (sum_j a_j v_j + fq[h] kv[h]) / (sum_j a_j + fq[h] . z[h] + eps),
//   a_j = exp(q[h] . k_j * scale - max), j over the window (this token included).
// Row r's inputs: q [H, D], k / v [KV, D], fq [H, F], fk [KV, F] (rows of q [R, H, D] etc.); returns [R, H, D].
// The reference is codexmini.ops.hybrid.hybrid_attn (tensors in time order instead of a ring, the state [F, D+1]).
at::Tensor hybrid_rows(std::vector<at::Tensor> kvs, std::vector<at::Tensor> zs, std::vector<at::Tensor> wks,
                       std::vector<at::Tensor> wfks, std::vector<at::Tensor> wv1s, std::vector<at::Tensor> metas,
                       const std::vector<int64_t>& starts, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& decay,
                       double scale, double eps, const char* what) {
  const int64_t B = static_cast<int64_t>(kvs.size());
  TORCH_CHECK(B > 0 && zs.size() == kvs.size() && wks.size() == kvs.size() && wfks.size() == kvs.size() &&
              wv1s.size() == kvs.size() && metas.size() == kvs.size(), what,
              ": one state, normaliser, window and meta per sequence");
  const int64_t R = segment_rows(starts, B, what);
  TORCH_CHECK(R > 0, what, ": no rows");
  TORCH_CHECK(kvs[0].dim() == 3 && wks[0].dim() == 3, what, ": state must be [H, F, D], the window [H, w, D]");
  std::vector<HybridSeq> seqs;
  std::vector<const void*> state_buffers, norm_buffers, window_buffers;
  for (int64_t b = 0; b < B; ++b) {
    seqs.push_back(hybrid_seq(kvs[b], zs[b], wks[b], wfks[b], wv1s[b], metas[b], kvs[0], wks[0], what));
    state_buffers.push_back(seqs[b].S);
    norm_buffers.push_back(seqs[b].Z);
    window_buffers.push_back(seqs[b].K);
  }
  check_distinct(state_buffers, what, "state");
  check_distinct(norm_buffers, what, "normaliser");
  check_distinct(window_buffers, what, "window");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &fq, &fk})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat, what, ": tensors must be contiguous float32");
  const int64_t H = kvs[0].size(0), Fd = kvs[0].size(1), D = kvs[0].size(2), W = wks[0].size(1);
  const int64_t KV = k.numel() / (R * D);
  TORCH_CHECK(q.numel() == R * H * D && fq.numel() == R * H * Fd && KV > 0 && H % KV == 0 &&
              k.numel() == R * KV * D && v.numel() == R * KV * D && fk.numel() == R * KV * Fd,
              what, ": q/k/v/fq/fk shapes do not match the state");
  TORCH_CHECK(decay.numel() == 0 || (decay.numel() == H && decay.is_contiguous() && decay.scalar_type() == at::kFloat),
              what, ": decay must be empty or float32 [H]");
  const int64_t groups = H / KV;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* fqp = fq.data_ptr<float>();
  const float* fkp = fk.data_ptr<float>();
  const float* dec = decay.numel() ? decay.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({R, H, D}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B * H, R * Fd * D >= 4096 ? 1 : B * H, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch(hybrid_scratch(D, W));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, r0 = starts[b], g = r0 * KV + h / groups;
      const HybridSeq& sq = seqs[b];
      HybridHead hh{sq.S + h * Fd * D, sq.Z + h * Fd, sq.K + h * W * D, sq.FK + h * W * Fd, sq.VV + h * W * (D + 1),
                    Fd, D, W, sq.count, sq.oldest, dec ? dec[h] : 1.f, scratch.data()};
      hybrid_head(hh, qp + (r0 * H + h) * D, H * D, fqp + (r0 * H + h) * Fd, H * Fd, kp + g * D, KV * D,
                  fkp + g * Fd, KV * Fd, vp + g * D, KV * D, o + (r0 * H + h) * D, H * D, starts[b + 1] - r0,
                  static_cast<float>(scale), static_cast<float>(eps));
    }
  });
  for (int64_t b = 0; b < B; ++b) {  // every head moved its ring alike: the sequence's meta, once
    const int64_t rows = starts[b + 1] - starts[b], fill = std::min(W - seqs[b].count, rows);
    seqs[b].meta[0] = seqs[b].count + fill;
    seqs[b].meta[1] = (seqs[b].oldest + (rows - fill)) % W;
  }
  return out;
}

at::Tensor hybrid_decode_(at::Tensor& kv, at::Tensor& z, at::Tensor& wk, at::Tensor& wfk, at::Tensor& wv1,
                          at::Tensor& meta, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& decay, double scale,
                          double eps) {
  return hybrid_rows({kv}, {z}, {wk}, {wfk}, {wv1}, {meta}, {0, 1}, q, k, v, fq, fk, decay, scale, eps,
                     "hybrid_decode_")[0];
}

// hybrid_decode_ for several sequences' runs of tokens (rows starts[b] .. starts[b+1]-1 continue sequence b; q
// [R, H, D], k / v [R, KV, D], fq [R, H, F], fk [R, KV, F]) in one call: prompt chunks, computed as decoding them
// token by token.
at::Tensor hybrid_segments_(std::vector<at::Tensor> kvs, std::vector<at::Tensor> zs, std::vector<at::Tensor> wks,
                            std::vector<at::Tensor> wfks, std::vector<at::Tensor> wv1s, std::vector<at::Tensor> metas,
                            const std::vector<int64_t>& starts, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& decay,
                            double scale, double eps) {
  return hybrid_rows(kvs, zs, wks, wfks, wv1s, metas, starts, q, k, v, fq, fk, decay, scale, eps,
                     "hybrid_segments_");
}

// One decoding step of a softmax layer whose matmuls are all panels of one bit width, q/k/v and gate/up each one
// fused call, for B rows (one per sequence, B <= kDecodeRows): Layer.forward_rows with these kernels, call for call
// (the same functions in the same order, so the same bits), in one call from Python instead of eight; a step of a
// 20-layer model spent ~25% of its time in the Python between them. ws / ss / zs: the weights, scales and zero
// tensors of q, k, v, o, gate, up, down. Each row's key and value go into slot ns[b] of its caches (the caller has
// made room and counts them). Returns the layer's output [B, hidden].
template <int BITS>
at::Tensor softmax_step_impl(const at::Tensor& x, const at::Tensor& in_norm, const at::Tensor& post_norm, double eps,
                             const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& ss,
                             const std::vector<at::Tensor>& zs, std::vector<at::Tensor>& kcaches,
                             std::vector<at::Tensor>& vcaches, const std::vector<int64_t>& ns, const at::Tensor& cos,
                             const at::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t hd, double scale) {
  auto cat = [&](const at::Tensor& in, size_t a, size_t b, bool silu) {  // matrices a .. b-1 side by side
    auto slice = [&](const std::vector<at::Tensor>& v) {
      return std::vector<at::Tensor>(v.begin() + a, v.begin() + b);
    };
    return panel_linear_cat<BITS>(in, slice(ws), slice(ss), slice(zs), silu);
  };
  at::Tensor qkv = cat(rms_norm(x, in_norm, eps), 0, 3, false);
  rope_(qkv, cos, sin, heads + kv_heads, hd);
  std::vector<int64_t> starts(ns.size() + 1);
  std::iota(starts.begin(), starts.end(), int64_t{0});
  const at::Tensor o = attend_segments_impl(qkv, kcaches, vcaches, ns, starts, heads, kv_heads, hd, scale, 0,
                                            "softmax_step");
  const at::Tensor h = panel_linear<BITS>(o, ws[3], ss[3], zs[3], x);
  const at::Tensor act = cat(rms_norm(h, post_norm, eps), 4, 6, true);
  return panel_linear<BITS>(act, ws[6], ss[6], zs[6], h);
}

at::Tensor softmax_step(const at::Tensor& x, const at::Tensor& in_norm, const at::Tensor& post_norm, double eps,
                        const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& ss,
                        const std::vector<at::Tensor>& zs, int64_t bits, std::vector<at::Tensor> kcaches,
                        std::vector<at::Tensor> vcaches, const std::vector<int64_t>& ns, const at::Tensor& cos,
                        const at::Tensor& sin, int64_t heads, int64_t kv_heads, int64_t hd, double scale) {
  TORCH_CHECK(ws.size() == 7 && ss.size() == 7 && zs.size() == 7, "softmax_step: the weights, scales and zero "
              "tensors of q, k, v, o, gate, up and down");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == static_cast<int64_t>(ns.size()) && x.size(0) <= kDecodeRows,
              "softmax_step: one row per sequence, at most ", kDecodeRows);
  switch (bits) {
    case 4: return softmax_step_impl<4>(x, in_norm, post_norm, eps, ws, ss, zs, kcaches, vcaches, ns, cos, sin, heads,
                                        kv_heads, hd, scale);
    case 3: return softmax_step_impl<3>(x, in_norm, post_norm, eps, ws, ss, zs, kcaches, vcaches, ns, cos, sin, heads,
                                        kv_heads, hd, scale);
    case 2: return softmax_step_impl<2>(x, in_norm, post_norm, eps, ws, ss, zs, kcaches, vcaches, ns, cos, sin, heads,
                                        kv_heads, hd, scale);
    default: TORCH_CHECK(false, "softmax_step: bits must be 4, 3 or 2, not ", bits);
  }
}

std::string isa() { return kIsa; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The matmuls and attention run without the GIL (their arguments are converted before it is let go, their
  // results after it is taken back): a server's HTTP thread works while the engine's thread computes.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("q8_linear", &q8_linear, nogil, "y = x W^T (+ residual) for a per-channel int8 weight; int8_act: up to "
        "gemv_rows() rows are quantized to int8 per 32 columns for integer dot products (llama.cpp's approach)",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("residual") = py::none(),
        py::arg("int8_act") = false);
  m.def("q4_linear", &group_linear<4>, nogil, "y = x W^T (+ residual) for a portable-layout int4 weight (zero: "
        "empty for symmetric, float16 mins for the _min schemes); int8_act: up to gemv_rows() rows are quantized to "
        "int8 per 32 columns for integer dot products",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("residual") = py::none(),
        py::arg("int8_act") = false);
  m.def("q3_linear", &group_linear<3>, nogil, "as q4_linear, for a portable-layout int3 weight (low plane, then "
        "high bits)",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("residual") = py::none(),
        py::arg("int8_act") = false);
  m.def("q2_linear", &group_linear<2>, nogil, "as q4_linear, for a portable-layout int2 weight",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("residual") = py::none(),
        py::arg("int8_act") = false);
  for (int bits : {4, 3, 2}) {
    const std::string name = std::string(linear_name(bits)) + "_cat";
    auto fn = bits == 4 ? &group_linear_cat<4> : bits == 3 ? &group_linear_cat<3> : &group_linear_cat<2>;
    m.def(name.c_str(), fn, nogil, "several group-quantized layers of one bit width on one input, outputs side by "
          "side; silu: silu(gate) * up of two", py::arg("x"), py::arg("qweights"), py::arg("scales"), py::arg("zeros"),
          py::arg("int8_act") = false, py::arg("silu") = false);
  }
  for (int bits : {4, 3, 2}) {
    const std::string name = panel_name(bits);
    auto one = bits == 4 ? &panel_linear<4> : bits == 3 ? &panel_linear<3> : &panel_linear<2>;
    auto cat = bits == 4 ? &panel_linear_cat<4> : bits == 3 ? &panel_linear_cat<3> : &panel_linear_cat<2>;
    m.def(name.c_str(), one, nogil, "y = x W^T (+ residual) for a weight of this width (q4p: int4, ...) repacked in "
          "panels of 16 rows (kernels.to_panels / to_lowbit_panels); int8 activations",
          py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("residual") = py::none());
    m.def((name + "_cat").c_str(), cat, nogil, "several panel layers of this width on one input, outputs side by "
          "side; silu: silu(gate) * up of two", py::arg("x"), py::arg("qweights"), py::arg("scales"),
          py::arg("zeros"), py::arg("silu") = false);
  }
  m.def("panel_dequant", &panel_dequant, "a weight in panels (q4p / q3p / q2p) as fp32 [N, K]: the rows a long "
        "prompt multiplies where the CPU has AMX", py::arg("qweight"), py::arg("scale"), py::arg("zero"),
        py::arg("bits"));
  m.def("panel_gemv_rows", [] { return kPanelRows; }, "inputs of up to this many rows take the panel GEMV "
        "(int8 activations); more the tiled GEMM");
  m.def("panel_layout", &panel_layout, "whether a weight of N rows, K columns, groups of G and `bits` bits takes the "
        "panels here", py::arg("N"), py::arg("K"), py::arg("G"), py::arg("bits") = 4);
  m.def("panels", [] { return CMX_PANELS ? kPanel : int64_t{0}; }, "rows per panel of the panel kernels "
        "(q4p_linear, q3p_linear, q2p_linear), or 0 where this build has none");
  m.def("q8_linear_cat", &q8_linear_cat, nogil, "several int8 layers on one input, outputs side by side; silu: "
        "silu(gate) * up of two", py::arg("x"), py::arg("qweights"), py::arg("scales"), py::arg("int8_act") = false,
        py::arg("silu") = false);
  m.def("rms_norm", &rms_norm, "w * x / sqrt(mean(x^2) + eps) per row");
  m.def("rope_", &rope_, "rotary embedding in place on the first heads of each row");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for [gate | up]");
  m.def("attend_decode", &attend_decode, nogil, "append this token's key/value to the cache and attend (one token)");
  m.def("attend_prompt", &attend_prompt, nogil, "append a prompt chunk's keys/values to the cache and attend each "
        "row causally, as token-by-token decoding would");
  m.def("attend_segments", &attend_segments, nogil, "attend_decode for several sequences' runs of rows (rows "
        "starts[b]..starts[b+1] continue sequence b from slot ns[b]): decoding steps, prompt chunks, or both at once");
  m.def("attend_decode_batch", &attend_decode_batch, nogil, "attend_decode for several sequences, one row of qkv each, "
        "in one parallel loop");
  m.def("linear_decode_", &linear_decode_, nogil, "one token of linear attention on its state (kv and normaliser z), "
        "in place");
  m.def("linear_segments_", &linear_segments_, nogil, "linear_decode_ for several sequences' runs of tokens (rows "
        "starts[b]..starts[b+1]-1 continue kvs[b] / zs[b]), token by token, in one parallel loop");
  m.def("hedgehog", &hedgehog, "hedgehog feature map of one token");
  m.def("hybrid_decode_", &hybrid_decode_, nogil, "one token of a hybrid (window + linear) layer, in place");
  m.def("hybrid_segments_", &hybrid_segments_, nogil, "hybrid_decode_ for several sequences' runs of tokens (rows "
        "starts[b]..starts[b+1]-1 continue sequence b), token by token, in one parallel loop");
  m.def("softmax_step", &softmax_step, nogil, "one decoding step of a softmax layer whose matmuls are panels of one "
        "width: Layer.forward_rows' calls in one");
  m.def("isa", &isa, "the SIMD instruction set the kernels were compiled for");
  m.def("vector_attention", [] { return group_attention(64, 1); }, "whether attention over a KV cache runs in AVX-512 "
        "here (float16 caches widened 16 values an instruction as they are read)");
  m.def("gemv_rows", [] { return kDecodeRows; }, "inputs of up to this many rows take the GEMVs (decoding); more "
        "rows the tiled GEMM (prompts)");
  m.def("bf16_prompts", [] { return g_bf16_prompts; }, "whether the fast activations run prompts' matmuls in bf16");
  m.def("bf16_native", [] { return kBf16Native; }, "whether this build's CPU multiplies bf16 natively");
  m.def("set_bf16_prompts", [](bool on) {
    TORCH_CHECK(!on || kBf16Native, "set_bf16_prompts: this build's CPU does not multiply bf16 natively");
    g_bf16_prompts = on;
  }, "run the fast activations' prompt matmuls in bf16 (true) or fp32");
  m.def("block", &block, "group sizes of `bits`-bit weights that are a multiple of this take the SIMD kernels "
        "(other sizes the layout allows run in plain C++)", py::arg("bits") = 4);
}
