// codexmini's own CPU kernels for the on-device runtime, compiled on first use by torch.utils.cpp_extension.
//
// They read the portable .cmx layout directly (no repacking, so the weights in memory are the file's):
//   int8: qweight [N, K] int8, scale [N] f32;                 w[n, k] = q * scale[n]
//   int4: qweight [N, K/2] u8 (column 2j in the low nibble, 2j+1 in the high one), scale [N, K/G] f32,
//         zero [N, K/G] u8;                                   w[n, k] = (code - zero) * scale  per group of G
// and compute y = x W^T (+ residual). One to four rows (decoding) take a SIMD GEMV (AVX2, with AVX-512 VNNI's
// vpdpbusd where the CPU has it, or plain C++; chosen at compile time): with fp32 activations the result equals the
// dequantized reference up to the order of fp32 additions; with int8 activations (the fast path) it equals
// int8-rounded activations times the dequantized weight. More rows (prompts) dequantize a tile of rows at a time
// and multiply with at::mm: in fp32, or with the fast activations (`int8_act`) in bf16 where the CPU multiplies
// bf16 natively (equal to bf16-rounded activations and weights, each tile's product rounded to bf16).
//
// The references these are tested against are in tests/runtime/test_cmx_kernels.py (the dequantization of
// codexmini.ops.layouts, and `int8_activations` there).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t BLOCK = 16;  // fp32-activation int4 path: 8 bytes -> 8 even + 8 odd columns per SIMD step
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
const char* kIsa = "avx512-vnni";  // the int8-activation dot products use vpdpbusd
#else
const char* kIsa = "avx2";
#endif
#else
constexpr int64_t BLOCK = 2;
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

// Whether this build's CPU multiplies bf16 natively (AVX-512 BF16, AMX or Arm BF16): there the fast activations
// run prompts' matmuls in bf16, at about twice the fp32 rate.
#if defined(__AVX512BF16__) || defined(__AMX_BF16__) || defined(__ARM_FEATURE_BF16)
constexpr bool kBf16Prompts = true;
#else
constexpr bool kBf16Prompts = false;
#endif

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
          for (int64_t j = 0; j < nt; ++j) yp[m * N + n0 + j] = silu_times(gp[m * nt + j], up[m * nt + j]);
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

// ------------------------------------------------------------------------------------------------ int4
// x reordered for the SIMD loop: in each block of BLOCK columns, the even columns first, then the odd ones (the
// order in which the low and high nibbles of BLOCK/2 bytes come out).
std::vector<float> reorder_even_odd(const float* x, int64_t K) {
  std::vector<float> r(K);
  const int64_t half = BLOCK / 2;
  for (int64_t b = 0; b < K; b += BLOCK)
    for (int64_t j = 0; j < half; ++j) {
      r[b + j] = x[b + 2 * j];
      r[b + half + j] = x[b + 2 * j + 1];
    }
  return r;
}

// sum over k in group g of x[k] * code[n, k], for each group of one row, folded with the group's scale and zero.
inline float q4_row(const float* xr, const float* gsum, const uint8_t* w, const float* scale, const uint8_t* zero,
                    int64_t K, int64_t G) {
  const int64_t ngroups = K / G;
  float zterm = 0.f;
  for (int64_t g = 0; g < ngroups; ++g) zterm += scale[g] * static_cast<float>(zero[g]) * gsum[g];
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += BLOCK) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, low4)));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4)));
      a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xr + k), a0);
      a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xr + k + 8), a1);
    }
    const __m256 s = _mm256_set1_ps(scale[g]);
    if (g & 1) acc1 = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, acc1);
    else acc0 = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), s, acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1)) - zterm;
#else
  float total = 0.f;
  for (int64_t g = 0; g < ngroups; ++g) {
    float a = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
      const uint8_t b = w[k / 2];
      a += xr[k] * static_cast<float>(b & 0x0F) + xr[k + 1] * static_cast<float>(b >> 4);
    }
    total += a * scale[g];
  }
  return total - zterm;
#endif
}

// The fast decoding path (llama.cpp's approach): the activation row is quantized to int8 per block of 32
// columns (x ~= xq * dx, round to nearest even, |xq| <= 127), and each block's dot product with the 4-bit codes is
// exact integer arithmetic (VNNI `vpdpbusd`, or AVX2 `maddubs` + `madd`). xq holds each block's even columns,
// then its odd ones (the order in which the nibbles unpack). The reference is in tests/runtime/test_cmx_kernels.py:
// the same int8 activations (`int8_activations`) times the dequantized weight.
struct QuantRow {
  std::vector<int8_t> xq;   // [K], per 32-block: 16 even columns, then 16 odd ones
  std::vector<float> dx;    // [K / 32] block scales
  std::vector<float> gsum;  // [K / G] sum of the dequantized activations per weight group (the zero-point term)
};

QuantRow quantize_row(const float* x, int64_t K, int64_t G, bool interleave = true) {
  QuantRow q{std::vector<int8_t>(K), std::vector<float>(K / 32), std::vector<float>(K / G, 0.f)};
  for (int64_t b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    q.dx[b] = d;
    int32_t total = 0;
    for (int j = 0; j < 16; ++j) {
      const int32_t e = static_cast<int32_t>(std::nearbyint(xb[2 * j] * inv));
      const int32_t o = static_cast<int32_t>(std::nearbyint(xb[2 * j + 1] * inv));
      q.xq[b * 32 + (interleave ? j : 2 * j)] = static_cast<int8_t>(e);
      q.xq[b * 32 + (interleave ? 16 + j : 2 * j + 1)] = static_cast<int8_t>(o);
      total += e + o;
    }
    q.gsum[b * 32 / G] += d * static_cast<float>(total);
  }
  return q;
}

#if defined(__AVX2__) && defined(__FMA__)
// The integer dot products of one 32-column block: 8 int32 lanes that sum to sum_j code_j * xq_j.
inline __m256i block_dot(const uint8_t* w16, const int8_t* xq32) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w16));
  const __m256i wq = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq32));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, xv);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xv), _mm256_set1_epi16(1));
#endif
}

#endif

// sum_g scale_g * zero_g * gsum_g: the zero points' share of one row.
inline float zero_term(const float* scale, const uint8_t* zero, const float* gsum, int64_t ngroups) {
  int64_t g = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= ngroups; g += 8) {
    const __m256 z =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zero + g))));
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + g), z), _mm256_loadu_ps(gsum + g), acc);
  }
  total = hsum(acc);
#endif
  for (; g < ngroups; ++g) total += scale[g] * static_cast<float>(zero[g]) * gsum[g];
  return total;
}

inline float q4_row_q8(const QuantRow& q, const uint8_t* w, const float* scale, const uint8_t* zero, int64_t K,
                       int64_t G) {
  const int64_t ngroups = K / G;
  const float zterm = zero_term(scale, zero, q.gsum.data(), ngroups);
  const int8_t* xq = q.xq.data();
  const float* dx = q.dx.data();
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  if (G == 32) {  // one block per group: scale * dx folded into one multiply and one FMA, two blocks per step
    const int64_t nb = K / 32;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      const __m256 d0 = _mm256_mul_ps(_mm256_cvtepi32_ps(block_dot(w + b * 16, xq + b * 32)), _mm256_set1_ps(dx[b]));
      const __m256 d1 = _mm256_mul_ps(_mm256_cvtepi32_ps(block_dot(w + b * 16 + 16, xq + b * 32 + 32)),
                                      _mm256_set1_ps(dx[b + 1]));
      acc0 = _mm256_fmadd_ps(d0, _mm256_set1_ps(scale[b]), acc0);
      acc1 = _mm256_fmadd_ps(d1, _mm256_set1_ps(scale[b + 1]), acc1);
    }
    for (; b < nb; ++b) {
      const __m256 d0 = _mm256_mul_ps(_mm256_cvtepi32_ps(block_dot(w + b * 16, xq + b * 32)), _mm256_set1_ps(dx[b]));
      acc0 = _mm256_fmadd_ps(d0, _mm256_set1_ps(scale[b]), acc0);
    }
  } else {
    const int64_t per = G / 32;
    for (int64_t g = 0; g < ngroups; ++g) {
      __m256 accg = _mm256_setzero_ps();
      for (int64_t b = g * per; b < (g + 1) * per; ++b)
        accg = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(w + b * 16, xq + b * 32)), _mm256_set1_ps(dx[b]), accg);
      if (g & 1) acc1 = _mm256_fmadd_ps(accg, _mm256_set1_ps(scale[g]), acc1);
      else acc0 = _mm256_fmadd_ps(accg, _mm256_set1_ps(scale[g]), acc0);
    }
  }
  return hsum(_mm256_add_ps(acc0, acc1)) - zterm;
#else
  float total = 0.f;
  for (int64_t g = 0; g < ngroups; ++g) {
    float accg = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      int32_t d = 0;
      for (int j = 0; j < 16; ++j) {
        const uint8_t b = w[k / 2 + j];
        d += static_cast<int32_t>(b & 0x0F) * xq[k + j] + static_cast<int32_t>(b >> 4) * xq[k + 16 + j];
      }
      accg += static_cast<float>(d) * dx[k / 32];
    }
    total += accg * scale[g];
  }
  return total - zterm;
#endif
}

void q4_dequant_rows(const uint8_t* w, const float* scale, const uint8_t* zero, int64_t n0, int64_t n1, int64_t K,
                     int64_t G, float* out) {
  const int64_t ngroups = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * (K / 2);
    float* o = out + (n - n0) * K;
    for (int64_t g = 0; g < ngroups; ++g) {
      const float s = scale[n * ngroups + g];
      const float z = static_cast<float>(zero[n * ngroups + g]);
      for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
        const uint8_t b = wr[k / 2];
        o[k] = (static_cast<float>(b & 0x0F) - z) * s;
        o[k + 1] = (static_cast<float>(b >> 4) - z) * s;
      }
    }
  }
}

// An int4 weight in the portable layout, checked: its shape and group size, and its rows as fp32 for tiled_gemm.
struct Q4Weight {
  int64_t N, K, G;
  const uint8_t* w;
  const float* scale;
  const uint8_t* zero;
  DequantRows dequant() const {
    return {N, [*this](int64_t a, int64_t b, float* out) { q4_dequant_rows(w, scale, zero, a, b, K, G, out); }};
  }
};

Q4Weight q4_weight(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "int4 qweight must be a contiguous uint8 [N, K/2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N,
              "int4 scale must be a contiguous float32 [N, K/G]");
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.is_contiguous() && zero.sizes() == scale.sizes(),
              "int4 zero must be a contiguous uint8 tensor shaped like scale");
  const int64_t G = K / std::max<int64_t>(scale.size(1), 1);
  TORCH_CHECK(G * scale.size(1) == K && G % BLOCK == 0, "int4 group size ", G, " must divide K=", K,
              " and be a multiple of ", BLOCK);
  return {N, K, G, qweight.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<uint8_t>()};
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& zero, const c10::optional<at::Tensor>& residual, bool int8_act) {
  const Q4Weight q4 = q4_weight(qweight, scale, zero);
  const int64_t N = q4.N, K = q4.K, G = q4.G, ngroups = K / G;
  check_input(x, K, "q4_linear");
  const int64_t M = x.size(0);
  check_residual(residual, M, N);
  const uint8_t* w = q4.w;
  const float* sc = q4.scale;
  const uint8_t* zp = q4.zero;
  if (M > 4) return tiled_gemm(x, K, {q4.dequant()}, residual, false, int8_act && kBf16Prompts);  // prompt
  at::Tensor y = new_output(residual, M, N);
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
    if (int8_act && G % 32 == 0) {
      const QuantRow q = quantize_row(xm, K, G);
      at::parallel_for(0, N, grain(K / 2), [&](int64_t a, int64_t b) {
        for (int64_t n = a; n < b; ++n)
          yp[m * N + n] += q4_row_q8(q, w + n * (K / 2), sc + n * ngroups, zp + n * ngroups, K, G);
      });
      continue;
    }
    std::vector<float> xr = reorder_even_odd(xm, K);
    std::vector<float> gsum(ngroups, 0.f);
    for (int64_t g = 0; g < ngroups; ++g)
      for (int64_t k = g * G; k < (g + 1) * G; ++k) gsum[g] += xm[k];
    at::parallel_for(0, N, grain(K / 2), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n)
        yp[m * N + n] += q4_row(xr.data(), gsum.data(), w + n * (K / 2), sc + n * ngroups, zp + n * ngroups, K, G);
    });
  }
  return y;
}

// ------------------------------------------------------------------------------------------------ int8
inline float q8_row(const float* x, const int8_t* w, int64_t K) {
  int64_t k = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 =
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
    const __m256 w1 = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8))));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
  }
  total = hsum(_mm256_add_ps(a0, a1));
#endif
  for (; k < K; ++k) total += x[k] * static_cast<float>(w[k]);
  return total;
}

// int8 weights times int8 activations (quantized per 32 columns, natural order): sum_b dx_b * sum_j w_j xq_j.
// The signed x signed products use the sign trick (|w| as the unsigned operand, xq with w's sign).
inline float q8_row_q8(const QuantRow& q, const int8_t* w, int64_t K) {
  const int8_t* xq = q.xq.data();
  const float* dx = q.dx.data();
  const int64_t nb = K / 32;
  float total = 0.f;
  int64_t b = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  auto dot32 = [&](int64_t blk) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + blk * 32));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + blk * 32));
    const __m256i ua = _mm256_sign_epi8(wv, wv), sx = _mm256_sign_epi8(xv, wv);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, sx));
#else
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ua, sx), _mm256_set1_epi16(1)));
#endif
  };
  for (; b + 2 <= nb; b += 2) {
    acc0 = _mm256_fmadd_ps(dot32(b), _mm256_set1_ps(dx[b]), acc0);
    acc1 = _mm256_fmadd_ps(dot32(b + 1), _mm256_set1_ps(dx[b + 1]), acc1);
  }
  for (; b < nb; ++b) acc0 = _mm256_fmadd_ps(dot32(b), _mm256_set1_ps(dx[b]), acc0);
  total = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; b < nb; ++b) {
    int32_t d = 0;
    for (int j = 0; j < 32; ++j) d += static_cast<int32_t>(w[b * 32 + j]) * xq[b * 32 + j];
    total += static_cast<float>(d) * dx[b];
  }
  return total;
}

// A per-channel int8 weight, checked, and its rows as fp32 for tiled_gemm.
struct Q8Weight {
  int64_t N, K;
  const int8_t* w;
  const float* scale;
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
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "int8 scale must be a contiguous float32 [N]");
  return {N, K, qweight.data_ptr<int8_t>(), scale.data_ptr<float>()};
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& residual, bool int8_act) {
  const Q8Weight q8 = q8_weight(qweight, scale);
  const int64_t N = q8.N, K = q8.K;
  check_input(x, K, "q8_linear");
  const int64_t M = x.size(0);
  check_residual(residual, M, N);
  const int8_t* w = q8.w;
  const float* sc = q8.scale;
  if (M > 4) return tiled_gemm(x, K, {q8.dequant()}, residual, false, int8_act && kBf16Prompts);  // prompt
  at::Tensor y = new_output(residual, M, N);
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
    if (int8_act && K % 32 == 0) {
      const QuantRow q = quantize_row(xm, K, K, false);
      at::parallel_for(0, N, grain(K), [&](int64_t a, int64_t b) {
        for (int64_t n = a; n < b; ++n) yp[m * N + n] += q8_row_q8(q, w + n * K, K) * sc[n];
      });
      continue;
    }
    at::parallel_for(0, N, grain(K), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) yp[m * N + n] += q8_row(xm, w + n * K, K) * sc[n];
    });
  }
  return y;
}

// Several int4 / int8 layers that read the same input (q/k/v, gate/up), their outputs side by side: one call
// instead of several, without concatenating their weights (which would copy them at load). `silu`: two layers
// (gate, up) give silu(gate) * up directly (see tiled_gemm).
at::Tensor silu_mul(const at::Tensor& gu);

at::Tensor q4_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& qweights,
                         const std::vector<at::Tensor>& scales, const std::vector<at::Tensor>& zeros, bool int8_act,
                         bool silu) {
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size() && qweights.size() == zeros.size(),
              "q4_linear_cat: one scale and one zero tensor per weight");
  TORCH_CHECK(!silu || qweights.size() == 2, "q4_linear_cat: silu takes two weights (gate, up)");
  std::vector<Q4Weight> parts;
  for (size_t i = 0; i < qweights.size(); ++i) parts.push_back(q4_weight(qweights[i], scales[i], zeros[i]));
  const int64_t K = parts[0].K, G = parts[0].G, M = x.size(0);
  for (const auto& p : parts) TORCH_CHECK(p.K == K, "q4_linear_cat: the weights read inputs of different widths");
  check_input(x, K, "q4_linear_cat");
  if (M > 4) {  // prompts: every part into its columns of one output
    std::vector<DequantRows> rows;
    for (const auto& p : parts) rows.push_back(p.dequant());
    return tiled_gemm(x, K, rows, c10::nullopt, silu, int8_act && kBf16Prompts);
  }
  bool same = int8_act && G % 32 == 0;
  for (const auto& p : parts) same = same && p.G == G;
  at::Tensor y;
  if (!same) {  // fp32 activations, or groups that differ: one call per part
    std::vector<at::Tensor> outs;
    for (size_t i = 0; i < qweights.size(); ++i)
      outs.push_back(q4_linear(x, qweights[i], scales[i], zeros[i], c10::nullopt, int8_act));
    y = at::cat(outs, 1);
  } else {  // decoding: the activation row quantized once, every part's rows in one parallel loop
    std::vector<int64_t> start{0};
    for (const auto& p : parts) start.push_back(start.back() + p.N);
    const int64_t N = start.back(), ngroups = K / G;
    y = at::empty({M, N}, at::kFloat);
    float* yp = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const QuantRow q = quantize_row(x.data_ptr<float>() + m * K, K, G);
      at::parallel_for(0, N, grain(K / 2), [&](int64_t a, int64_t b) {
        size_t i = 0;
        for (int64_t n = a; n < b; ++n) {
          while (n >= start[i + 1]) ++i;
          const Q4Weight& p = parts[i];
          const int64_t r = n - start[i];
          yp[m * N + n] = q4_row_q8(q, p.w + r * (K / 2), p.scale + r * ngroups, p.zero + r * ngroups, K, G);
        }
      });
    }
  }
  return silu ? silu_mul(y) : y;
}

at::Tensor q8_linear_cat(const at::Tensor& x, const std::vector<at::Tensor>& qweights,
                         const std::vector<at::Tensor>& scales, bool int8_act, bool silu) {
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size(), "q8_linear_cat: one scale tensor per weight");
  TORCH_CHECK(!silu || qweights.size() == 2, "q8_linear_cat: silu takes two weights (gate, up)");
  std::vector<Q8Weight> parts;
  for (size_t i = 0; i < qweights.size(); ++i) parts.push_back(q8_weight(qweights[i], scales[i]));
  for (const auto& p : parts)
    TORCH_CHECK(p.K == parts[0].K, "q8_linear_cat: the weights read inputs of different widths");
  check_input(x, parts[0].K, "q8_linear_cat");
  if (x.size(0) > 4) {
    std::vector<DequantRows> rows;
    for (const auto& p : parts) rows.push_back(p.dequant());
    return tiled_gemm(x, parts[0].K, rows, c10::nullopt, silu, int8_act && kBf16Prompts);
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
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += r[d] * r[d];
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
    for (int64_t i = 0; i < I; ++i) o[t * I + i] = silu_times(p[t * 2 * I + i], p[t * 2 * I + I + i]);
  return y;
}

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

// One decoding step of softmax attention with a KV cache: writes this token's key and value (rows of qkv [1, C]
// after the query heads) into slot n of kcache / vcache [KV, capacity, hd], then attends each query head over
// slots [n + 1 - window, n] (all of 0..n when window <= 0) of its KV group. Returns [1, heads * hd].
at::Tensor attend_decode(const at::Tensor& qkv, at::Tensor& kcache, at::Tensor& vcache, int64_t n, int64_t heads,
                         int64_t kv_heads, int64_t hd, double scale, int64_t window) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == 1 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() &&
              qkv.size(1) >= (heads + 2 * kv_heads) * hd, "attend_decode: qkv must be float32 [1, (H + 2 KV) hd]");
  TORCH_CHECK(kcache.dim() == 3 && kcache.is_contiguous() && vcache.is_contiguous() &&
              kcache.sizes() == vcache.sizes() &&
              kcache.size(0) == kv_heads && kcache.size(2) == hd && kcache.scalar_type() == at::kFloat &&
              vcache.scalar_type() == at::kFloat, "attend_decode: caches must be float32 [KV, capacity, hd]");
  const int64_t cap = kcache.size(1);
  TORCH_CHECK(n >= 0 && n < cap, "attend_decode: slot ", n, " is outside the cache capacity ", cap);
  TORCH_CHECK(heads % kv_heads == 0, "attend_decode: ", heads, " heads do not split into ", kv_heads, " groups");
  const float* q = qkv.data_ptr<float>();
  float* kc = kcache.data_ptr<float>();
  float* vc = vcache.data_ptr<float>();
  for (int64_t g = 0; g < kv_heads; ++g) {
    std::copy(q + (heads + g) * hd, q + (heads + g + 1) * hd, kc + (g * cap + n) * hd);
    std::copy(q + (heads + kv_heads + g) * hd, q + (heads + kv_heads + g + 1) * hd, vc + (g * cap + n) * hd);
  }
  const int64_t lo = window > 0 ? std::max<int64_t>(0, n + 1 - window) : 0, S = n + 1 - lo;
  const int64_t groups = heads / kv_heads;
  at::Tensor out = at::empty({1, heads * hd}, at::kFloat);
  float* o = out.data_ptr<float>();
  const int64_t grain = S * hd >= 16384 ? 1 : heads;  // short caches: one thread, no fork/join
  at::parallel_for(0, heads, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(S);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q + h * hd;
      const float* K = kc + ((h / groups) * cap + lo) * hd;
      const float* V = vc + ((h / groups) * cap + lo) * hd;
      float m = -INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        p[j] = dot(qh, K + j * hd, hd) * static_cast<float>(scale);
        m = std::max(m, p[j]);
      }
      float denom = 0.f;
      for (int64_t j = 0; j < S; ++j) {
        p[j] = std::exp(p[j] - m);
        denom += p[j];
      }
      float* oh = o + h * hd;
      std::fill(oh, oh + hd, 0.f);
      for (int64_t j = 0; j < S; ++j) {
        const float pj = p[j] / denom;
        const float* vj = V + j * hd;
        for (int64_t d = 0; d < hd; ++d) oh[d] += pj * vj[d];
      }
    }
  });
  return out;
}

// One decoding step of linear attention on a fixed-size state, in place: for each head h (KV group g = h / (H/KV)),
//   state[h] = decay[h] * state[h] + fk[g]^T [v[g], 1],   o = fq[h] state[h],   out[h] = o[:D] / (o[D] + eps).
// state [H, F, D+1], fq [H, F], fk [KV, F], v [KV, D]; decay [H] multiplicative, or empty for none. One pass over
// the state (the reference, codexmini.ops.linear_attn's recurrence, makes several and allocates each).
at::Tensor linear_decode_(at::Tensor& state, const at::Tensor& fq, const at::Tensor& fk, const at::Tensor& v,
                          const at::Tensor& decay, double eps) {
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous() && state.scalar_type() == at::kFloat,
              "linear_decode_: state must be float32 [H, F, D+1]");
  const int64_t H = state.size(0), Fd = state.size(1), D = state.size(2) - 1;
  TORCH_CHECK(fq.is_contiguous() && fq.scalar_type() == at::kFloat && fq.numel() == H * Fd,
              "linear_decode_: fq must be float32 [H, F]");
  TORCH_CHECK(fk.is_contiguous() && v.is_contiguous() && fk.scalar_type() == at::kFloat &&
              v.scalar_type() == at::kFloat && fk.numel() % Fd == 0,
              "linear_decode_: fk / v must be float32 [KV, F] / [KV, D]");
  const int64_t KV = fk.numel() / Fd;
  TORCH_CHECK(KV > 0 && H % KV == 0 && v.numel() == KV * D, "linear_decode_: ", KV, " key heads do not match ", H,
              " heads and v of ", v.numel(), " values");
  TORCH_CHECK(decay.numel() == 0 || (decay.numel() == H && decay.is_contiguous() && decay.scalar_type() == at::kFloat),
              "linear_decode_: decay must be empty or float32 [H]");
  const int64_t groups = H / KV, V1 = D + 1;
  float* S = state.data_ptr<float>();
  const float* q = fq.data_ptr<float>();
  const float* k = fk.data_ptr<float>();
  const float* vv = v.data_ptr<float>();
  const float* dec = decay.numel() ? decay.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({H, D}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, H, Fd * V1 >= 4096 ? 1 : H, [&](int64_t h0, int64_t h1) {
    std::vector<float> v1(V1), acc(V1);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t g = h / groups;
      std::copy(vv + g * D, vv + (g + 1) * D, v1.begin());
      v1[D] = 1.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      const float a = dec ? dec[h] : 1.f;
      for (int64_t f = 0; f < Fd; ++f) {
        float* row = S + (h * Fd + f) * V1;
        const float kf = k[g * Fd + f], qf = q[h * Fd + f];
        for (int64_t d = 0; d < V1; ++d) {
          row[d] = a * row[d] + kf * v1[d];
          acc[d] += qf * row[d];
        }
      }
      const float inv = 1.f / (acc[D] + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d) o[h * D + d] = acc[d] * inv;
    }
  });
  return out;
}

// Hedgehog feature map of one token: proj = x[h] w[h] (x [H, D], w [H, D, Fh]) -> [softmax(proj), softmax(-proj)].
at::Tensor hedgehog(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == at::kFloat &&
              w.scalar_type() == at::kFloat &&
              w.dim() == 3 && x.numel() == w.size(0) * w.size(1), "hedgehog: x must be float32 [H, D], w [H, D, Fh]");
  const int64_t H = w.size(0), D = w.size(1), Fh = w.size(2);
  at::Tensor out = at::empty({H, 2 * Fh}, at::kFloat);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<float> proj(Fh);
  for (int64_t h = 0; h < H; ++h) {
    std::fill(proj.begin(), proj.end(), 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float xd = xp[h * D + d];
      const float* wr = wp + (h * D + d) * Fh;
      for (int64_t f = 0; f < Fh; ++f) proj[f] += xd * wr[f];
    }
    float mx = -INFINITY, mn = INFINITY;
    for (int64_t f = 0; f < Fh; ++f) { mx = std::max(mx, proj[f]); mn = std::min(mn, proj[f]); }
    float sp = 0.f, sn = 0.f;
    float* op = o + h * 2 * Fh;
    for (int64_t f = 0; f < Fh; ++f) {
      op[f] = std::exp(proj[f] - mx);
      op[Fh + f] = std::exp(mn - proj[f]);
      sp += op[f];
      sn += op[Fh + f];
    }
    for (int64_t f = 0; f < Fh; ++f) { op[f] /= sp; op[Fh + f] /= sn; }
  }
  return out;
}

// One decoding step of a hybrid layer: softmax attention over a sliding window of the last `w` keys plus linear
// attention over every key that has left it. The window is a ring buffer in place: wk [H, w, D], wfk [H, w, F],
// wv1 [H, w, D+1] (keys, their features and [value, 1], per query head), with meta = [count, oldest slot] (int64,
// updated in place). When the window is full its oldest key leaves into the state (state = decay * state +
// fk_old^T v1_old, decay applied every step); the new key takes a slot; then
//   out[h] = (sum_j a_j v_j + (fq[h] state[h])[:D]) / (sum_j a_j + (fq[h] state[h])[D] + eps),
//   a_j = exp(q[h] . k_j * scale - max), j over the window (this token included).
// The reference is codexmini.ops.hybrid.hybrid_attn (tensors in time order instead of a ring).
at::Tensor hybrid_decode_(at::Tensor& state, at::Tensor& wk, at::Tensor& wfk, at::Tensor& wv1, at::Tensor& meta,
                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& fq,
                          const at::Tensor& fk, const at::Tensor& decay, double scale, double eps) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&state, &wk, &wfk, &wv1, &q, &k, &v, &fq, &fk})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat,
                "hybrid_decode_: tensors must be contiguous float32");
  TORCH_CHECK(meta.numel() == 2 && meta.scalar_type() == at::kLong,
              "hybrid_decode_: meta must be int64 [count, oldest]");
  const int64_t H = state.size(0), Fd = state.size(1), D = state.size(2) - 1, W = wk.size(1);
  TORCH_CHECK(wk.sizes() == at::IntArrayRef({H, W, D}) && wfk.sizes() == at::IntArrayRef({H, W, Fd}) &&
              wv1.sizes() == at::IntArrayRef({H, W, D + 1}), "hybrid_decode_: window buffers must be [H, w, D|F|D+1]");
  const int64_t KV = k.numel() / D;
  TORCH_CHECK(q.numel() == H * D && fq.numel() == H * Fd && KV > 0 && H % KV == 0 && v.numel() == KV * D &&
              fk.numel() == KV * Fd, "hybrid_decode_: q/k/v/fq/fk shapes do not match the state");
  TORCH_CHECK(decay.numel() == 0 || (decay.numel() == H && decay.is_contiguous() && decay.scalar_type() == at::kFloat),
              "hybrid_decode_: decay must be empty or float32 [H]");
  int64_t* mp = meta.data_ptr<int64_t>();
  const int64_t count = mp[0], oldest = mp[1];
  TORCH_CHECK(count >= 0 && count <= W && oldest >= 0 && oldest < W, "hybrid_decode_: bad window meta");
  const bool full = count == W;
  const int64_t slot = full ? oldest : (oldest + count) % W;
  const int64_t groups = H / KV, V1 = D + 1;
  float* S = state.data_ptr<float>();
  float* K = wk.data_ptr<float>();
  float* FK = wfk.data_ptr<float>();
  float* VV = wv1.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* fqp = fq.data_ptr<float>();
  const float* fkp = fk.data_ptr<float>();
  const float* dec = decay.numel() ? decay.data_ptr<float>() : nullptr;
  const int64_t n = full ? W : count + 1;
  at::Tensor out = at::empty({H, D}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, H, H, [&](int64_t h0, int64_t h1) {
    std::vector<float> lin(V1), num(D), a(W);
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t g = h / groups;
      const float dh = dec ? dec[h] : 1.f;
      const float* fold = FK + (h * W + slot) * Fd;   // the leaving key's features (when full)
      const float* vold = VV + (h * W + slot) * V1;
      std::fill(lin.begin(), lin.end(), 0.f);
      for (int64_t f = 0; f < Fd; ++f) {
        float* row = S + (h * Fd + f) * V1;
        const float qf = fqp[h * Fd + f];
        if (full) {
          const float kf = fold[f];
          for (int64_t d = 0; d < V1; ++d) {
            row[d] = dh * row[d] + kf * vold[d];
            lin[d] += qf * row[d];
          }
        } else {
          for (int64_t d = 0; d < V1; ++d) {
            row[d] = dh * row[d];
            lin[d] += qf * row[d];
          }
        }
      }
      // the new token takes the slot
      std::copy(kp + g * D, kp + (g + 1) * D, K + (h * W + slot) * D);
      std::copy(fkp + g * Fd, fkp + (g + 1) * Fd, FK + (h * W + slot) * Fd);
      std::copy(vp + g * D, vp + (g + 1) * D, VV + (h * W + slot) * V1);
      VV[(h * W + slot) * V1 + D] = 1.f;
      // softmax over the window (slots in any order: the sum does not care)
      float m = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t sl = full ? j : (oldest + j) % W;
        a[j] = dot(qp + h * D, K + (h * W + sl) * D, D) * static_cast<float>(scale);
        m = std::max(m, a[j]);
      }
      float den = 0.f;
      std::fill(num.begin(), num.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t sl = full ? j : (oldest + j) % W;
        const float e = std::exp(a[j] - m);
        den += e;
        const float* vj = VV + (h * W + sl) * V1;
        for (int64_t d = 0; d < D; ++d) num[d] += e * vj[d];
      }
      const float inv = 1.f / (den + lin[D] + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d) o[h * D + d] = (num[d] + lin[d]) * inv;
    }
  });
  if (full) mp[1] = (oldest + 1) % W;
  else mp[0] = count + 1;
  return out;
}

std::string isa() { return kIsa; }
int64_t block() { return BLOCK; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "y = x W^T (+ residual) for a portable-layout int4 weight; int8_act: one-row "
        "inputs are quantized to int8 per 32 columns for integer dot products (llama.cpp's approach)",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("residual") = py::none(),
        py::arg("int8_act") = false);
  m.def("q8_linear", &q8_linear, "y = x W^T (+ residual) for a per-channel int8 weight",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("residual") = py::none(),
        py::arg("int8_act") = false);
  m.def("q4_linear_cat", &q4_linear_cat, "several int4 layers on one input, outputs side by side; silu: "
        "silu(gate) * up of two", py::arg("x"), py::arg("qweights"), py::arg("scales"), py::arg("zeros"),
        py::arg("int8_act") = false, py::arg("silu") = false);
  m.def("q8_linear_cat", &q8_linear_cat, "several int8 layers on one input, outputs side by side; silu: "
        "silu(gate) * up of two", py::arg("x"), py::arg("qweights"), py::arg("scales"), py::arg("int8_act") = false,
        py::arg("silu") = false);
  m.def("rms_norm", &rms_norm, "w * x / sqrt(mean(x^2) + eps) per row");
  m.def("rope_", &rope_, "rotary embedding in place on the first heads of each row");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for [gate | up]");
  m.def("attend_decode", &attend_decode, "append this token's key/value to the cache and attend (one token)");
  m.def("linear_decode_", &linear_decode_, "one token of linear attention on its state, in place");
  m.def("hedgehog", &hedgehog, "hedgehog feature map of one token");
  m.def("hybrid_decode_", &hybrid_decode_, "one token of a hybrid (window + linear) layer, in place");
  m.def("isa", &isa, "the SIMD instruction set the kernels were compiled for");
  m.def("bf16_prompts", [] { return kBf16Prompts; }, "whether the fast activations run prompts' matmuls in bf16");
  m.def("block", &block, "int4 group sizes must be a multiple of this");
}
