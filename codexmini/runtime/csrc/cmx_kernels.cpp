// codexmini's own CPU kernels for the on-device runtime, compiled on first use by torch.utils.cpp_extension.
//
// They read the portable .cmx layout directly (no repacking, so the weights in memory are the file's):
//   int8: qweight [N, K] int8, scale [N] f32;                 w[n, k] = q * scale[n]
//   int4: qweight [N, K/2] u8 (column 2j in the low nibble, 2j+1 in the high one), scale [N, K/G] f32,
//         zero [N, K/G] u8;                                   w[n, k] = (code - zero) * scale  per group of G
// and compute y = x W^T (+ residual) with fp32 activations, so the result equals the dequantized reference up to
// the order of fp32 additions. A one-row input (decoding) takes a SIMD GEMV (AVX-512, AVX2 or plain C++, chosen at
// compile time); more rows (prefill) dequantize a tile of rows at a time and multiply with at::mm.
//
// The reference these are tested against is `dequantize` in runtime/kernels.py (tests/runtime/test_cmx_kernels.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t BLOCK = 32;  // int4 columns per SIMD step: 16 bytes -> 16 even + 16 odd columns
const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t BLOCK = 16;  // 8 bytes -> 8 even + 8 odd columns
const char* kIsa = "avx2";
#else
constexpr int64_t BLOCK = 2;
const char* kIsa = "generic";
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
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t g = 0; g < ngroups; ++g) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += BLOCK) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k / 2));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low4)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low4)));
      a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr + k), a0);
      a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + k + 16), a1);
    }
    const __m512 s = _mm512_set1_ps(scale[g]);
    if (g & 1) acc1 = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), s, acc1);
    else acc0 = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), s, acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - zterm;
#elif defined(__AVX2__) && defined(__FMA__)
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
  const __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r) - zterm;
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

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const at::Tensor& zero, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "int4 qweight must be a contiguous uint8 [N, K/2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N,
              "int4 scale must be a contiguous float32 [N, K/G]");
  TORCH_CHECK(zero.scalar_type() == at::kByte && zero.is_contiguous() && zero.sizes() == scale.sizes(),
              "int4 zero must be a contiguous uint8 tensor shaped like scale");
  const int64_t G = K / scale.size(1);
  TORCH_CHECK(G * scale.size(1) == K && G % BLOCK == 0, "int4 group size ", G, " must divide K=", K,
              " and be a multiple of ", BLOCK);
  check_input(x, K, "q4_linear");
  const int64_t M = x.size(0);
  check_residual(residual, M, N);
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const float* sc = scale.data_ptr<float>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  const int64_t ngroups = K / G;
  if (M > 4) {  // prefill: dequantize a tile of rows, then one fp32 GEMM per tile
    at::Tensor y = residual ? residual->clone() : at::empty({M, N}, at::kFloat);
    at::Tensor tile = at::empty({std::min(kTileRows, N), K}, at::kFloat);
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(n0 + kTileRows, N);
      float* t = tile.data_ptr<float>();
      at::parallel_for(n0, n1, kRowGrain, [&](int64_t a, int64_t b) {
        q4_dequant_rows(w, sc, zp, a, b, K, G, t + (a - n0) * K);
      });
      at::Tensor part = at::mm(x, tile.narrow(0, 0, n1 - n0).t());
      if (residual) y.narrow(1, n0, n1 - n0).add_(part);
      else y.narrow(1, n0, n1 - n0).copy_(part);
    }
    return y;
  }
  at::Tensor y = new_output(residual, M, N);
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
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
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k))));
    const __m512 w1 = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16))));
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), a1);
  }
  total = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
    const __m256 w1 = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k + 8))));
    a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1);
  }
  const __m256 acc = _mm256_add_ps(a0, a1);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  total = _mm_cvtss_f32(r);
#endif
  for (; k < K; ++k) total += x[k] * static_cast<float>(w[k]);
  return total;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous(),
              "int8 qweight must be a contiguous int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "int8 scale must be a contiguous float32 [N]");
  check_input(x, K, "q8_linear");
  const int64_t M = x.size(0);
  check_residual(residual, M, N);
  const int8_t* w = qweight.data_ptr<int8_t>();
  const float* sc = scale.data_ptr<float>();
  if (M > 4) {
    at::Tensor y = residual ? residual->clone() : at::empty({M, N}, at::kFloat);
    at::Tensor tile = at::empty({std::min(kTileRows, N), K}, at::kFloat);
    for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
      const int64_t n1 = std::min(n0 + kTileRows, N);
      float* t = tile.data_ptr<float>();
      at::parallel_for(n0, n1, kRowGrain, [&](int64_t a, int64_t b) {
        for (int64_t n = a; n < b; ++n)
          for (int64_t k = 0; k < K; ++k) t[(n - n0) * K + k] = static_cast<float>(w[n * K + k]) * sc[n];
      });
      at::Tensor part = at::mm(x, tile.narrow(0, 0, n1 - n0).t());
      if (residual) y.narrow(1, n0, n1 - n0).add_(part);
      else y.narrow(1, n0, n1 - n0).copy_(part);
    }
    return y;
  }
  at::Tensor y = new_output(residual, M, N);
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
    at::parallel_for(0, N, grain(K), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) yp[m * N + n] += q8_row(xm, w + n * K, K) * sc[n];
    });
  }
  return y;
}

std::string isa() { return kIsa; }
int64_t block() { return BLOCK; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "y = x W^T (+ residual) for a portable-layout int4 weight",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("zero"), py::arg("residual") = py::none());
  m.def("q8_linear", &q8_linear, "y = x W^T (+ residual) for a per-channel int8 weight",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("residual") = py::none());
  m.def("isa", &isa, "the SIMD instruction set the kernels were compiled for");
  m.def("block", &block, "int4 group sizes must be a multiple of this");
}
