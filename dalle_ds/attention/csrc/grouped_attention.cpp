// Fused CPU kernel for the grouped attention of kernels.py (on CPU: the sparse patterns, and full
// attention at short lengths).
//
// One call runs a whole GroupPlan: per chunk of a bucket, g groups, each of lq queries scored
// against the bucket's a shared keys (unmasked) and the group's ls own keys (under `bias`), in
// one softmax. Positions are sequence indices; -1, and positions past the prefix length n, are
// padding: such queries are skipped, such keys gathered as zeros. The group's bias masks every
// own key a query may not see; shared keys are unmasked, as the plan only shares a key with
// queries after it (so a shared key past the prefix is seen only by skipped queries). Every
// (batch, head) slice is one task: per chunk
// its shared keys are gathered once, then each group's scores are made, normalised and used
// while they sit in cache. That is what makes this faster than the batched-matmul path, which
// writes every score tensor to memory and reads it back several times.
//
// The backward is FlashAttention's: the probabilities are recomputed from the saved log-sum-exp,
// and dS = P * (dP - rowsum(dO * O)). Gradients are accumulated in fp32; since a task owns one
// (batch, head) slice, no two threads ever write the same row. Matmuls are ATen's cpublas
// brgemm (C = A @ B, row-major, dense), so operands that must be transposed are copied so.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// C (m x n) = A (m x k) @ B (k x n), or C += A @ B with `accumulate`; row-major and dense.
// ATen's brgemm: measured 2-2.5x faster than BLAS sgemm_ at these small shapes.
void matmul(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c, bool accumulate = false) {
  if (m > 0 && n > 0) at::native::cpublas::brgemm(m, n, k, k, n, n, accumulate, a, b, c, false);
}

// out (cols x rows, row stride ld_out) = x (rows x cols, dense)^T, in blocks of rows that stay
// in L1, each written row of out contiguous.
void transpose(const float* x, int64_t rows, int64_t cols, float* out, int64_t ld_out) {
  constexpr int64_t kBlock = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t col = 0; col < cols; col++)
      for (int64_t r = r0; r < r1; r++) out[col * ld_out + r] = x[r * cols + col];
  }
}

// 16 floats as one value; GCC lowers its arithmetic to the widest vectors the flags allow.
using f32x16 = float __attribute__((vector_size(64)));
using i32x16 = int32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

f32x16 splat(float x) { return f32x16{} + x; }

// exp of 16 lanes: x = j ln2 + r with |r| <= ln2 / 2, exp(x) = 2^j * p(r), p the Taylor
// polynomial of degree 6 (relative error < 2e-7). Lanes below -87 (-inf included) give 0.
inline __attribute__((always_inline)) f32x16 exp16(f32x16 x) {
  f32x16 v = x < splat(-87.0f) ? splat(-87.0f) : x;
  v = v > splat(88.0f) ? splat(88.0f) : v;
  const f32x16 t = v * 1.44269504088896341f;
  const i32x16 j = __builtin_convertvector(t + (t >= splat(0.0f) ? splat(0.5f) : splat(-0.5f)), i32x16);
  const f32x16 jf = __builtin_convertvector(j, f32x16);
  const f32x16 r = (v - jf * 0.693359375f) + jf * 2.12194440e-4f;  // ln2 in two parts
  f32x16 p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const f32x16 two_j = reinterpret_cast<const f32x16&>(static_cast<const i32x16&>((j + 127) << 23));
  return x < splat(-87.0f) ? splat(0.0f) : p * two_j;
}

// x <- exp(x - shift), in place; returns the sum of the results.
float exp_sum(float* x, int64_t len, float shift) {
  f32x16 sum = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    f32x16 v;
    std::memcpy(&v, x + i, sizeof(v));
    v = exp16(v - shift);
    sum += v;
    std::memcpy(x + i, &v, sizeof(v));
  }
  if (i < len) {  // the tail, through a padded copy whose extra lanes give 0
    f32x16 v = splat(kNegInf);
    std::memcpy(&v, x + i, (len - i) * sizeof(float));
    v = exp16(v - shift);
    sum += v;
    std::memcpy(x + i, &v, (len - i) * sizeof(float));
  }
  float total = 0.0f;
  for (int64_t lane = 0; lane < kLanes; lane++) total += sum[lane];
  return total;
}

// The rows of one (batch, head) slice of a (b, h, n, d) tensor with unit stride along d.
template <typename T>
struct Rows {
  T* base;
  int64_t row_stride;
  T* row(int64_t pos) const { return base + pos * row_stride; }
};

template <typename T>
Rows<T> slice_rows(const at::Tensor& x, int64_t bh) {
  const int64_t heads = x.size(1);
  T* base = x.data_ptr<T>() + (bh / heads) * x.stride(0) + (bh % heads) * x.stride(1);
  return {base, x.stride(2)};
}

// The index tensors of one chunk of a bucket.
struct Chunk {
  int64_t n, d, a, g, lq, ls, s;  // s = a + ls keys per group
  const int64_t* shared;  // (a,)
  const int64_t* queries;  // (g, lq)
  const int64_t* keys;  // (g, ls)
  const float* bias;  // (g, lq, ls)
  const float* bias_t;  // (g, ls, lq): its transpose, for the backward

  Chunk(int64_t n_, int64_t d_, const at::Tensor& shared_, const at::Tensor& queries_, const at::Tensor& keys_,
        const at::Tensor& bias_, const at::Tensor& bias_t_)
      : n(n_), d(d_), a(shared_.size(0)), g(queries_.size(0)), lq(queries_.size(1)), ls(keys_.size(1)),
        s(a + ls), shared(shared_.data_ptr<int64_t>()), queries(queries_.data_ptr<int64_t>()),
        keys(keys_.data_ptr<int64_t>()), bias(bias_.data_ptr<float>()), bias_t(bias_t_.data_ptr<float>()) {}

  bool valid(int64_t pos) const { return pos >= 0 && pos < n; }
  // key j of group `group`: the shared keys first, then the group's own
  int64_t key(int64_t group, int64_t j) const { return j < a ? shared[j] : keys[group * ls + j - a]; }
  int64_t query(int64_t group, int64_t i) const { return queries[group * lq + i]; }
};

// Gathers the group's keys [from, to) of x as rows of `rows` (s x d); padding keys become zeros.
template <typename T>
void gather_keys(const Chunk& c, int64_t group, const Rows<T>& x, int64_t from, int64_t to, float* rows) {
  for (int64_t j = from; j < to; j++) {
    const int64_t pos = c.key(group, j);
    float* dst = rows + j * c.d;
    if (!c.valid(pos)) {
      std::fill(dst, dst + c.d, 0.0f);
      continue;
    }
    const T* src = x.row(pos);
    for (int64_t e = 0; e < c.d; e++) dst[e] = static_cast<float>(src[e]);
  }
}

// Gathers the group's query rows of x (lq x d), times `scale`; padding queries become zeros.
template <typename T>
void gather_queries(const Chunk& c, int64_t group, const Rows<T>& x, float scale, float* out) {
  for (int64_t i = 0; i < c.lq; i++) {
    const int64_t pos = c.query(group, i);
    const T* src = c.valid(pos) ? x.row(pos) : nullptr;
    for (int64_t e = 0; e < c.d; e++) out[i * c.d + e] = src ? static_cast<float>(src[e]) * scale : 0.0f;
  }
}

// The group's bias on its own keys' scores. It masks every key a real query of the prefix may
// not see, padding included: shared keys are seen by all the bucket's queries, and a key past
// the prefix only by queries past it (causality), which are skipped.
void add_bias(const Chunk& c, int64_t group, float* scores) {
  for (int64_t i = 0; i < c.lq; i++) {
    float* row = scores + i * c.s + c.a;
    const float* bias = c.bias + (group * c.lq + i) * c.ls;
    for (int64_t j = 0; j < c.ls; j++) row[j] += bias[j];
  }
}

float row_max(const float* row, int64_t len) {
  f32x16 top16 = splat(kNegInf);
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    f32x16 v;
    std::memcpy(&v, row + j, sizeof(v));
    top16 = v > top16 ? v : top16;
  }
  float top = kNegInf;
  for (int64_t lane = 0; lane < kLanes; lane++) top = std::max(top, top16[lane]);
  for (; j < len; j++) top = std::max(top, row[j]);
  return top;
}

// Rows of `part` for the group's keys [from, to) added into a (batch, head) slice's fp32
// gradient (n x d); padding dropped.
void scatter_add(const Chunk& c, int64_t group, int64_t from, int64_t to, const float* part, float* slice) {
  for (int64_t j = from; j < to; j++) {
    const int64_t pos = c.key(group, j);
    if (!c.valid(pos)) continue;
    float* dst = slice + pos * c.d;
    const float* src = part + (j - from) * c.d;
    for (int64_t e = 0; e < c.d; e++) dst[e] += src[e];
  }
}

// Per-thread scratch, grown to the largest chunk and reused for every group.
struct Scratch {
  std::vector<float> xq, xq_t, d_out, d_out_t, ks, kt, vs, p, dp, o, lse_q, delta, dk_shared, dv_shared, inv;

  float* get(std::vector<float>& buffer, int64_t size) {
    if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
    return buffer.data();
  }
};

// The tensors of a call, with the (b, h) slice a task works on.
template <typename T>
struct Slice {
  Rows<T> q, k, v, out;
  float* lse;

  Slice(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
        const at::Tensor& lse_, int64_t bh)
      : q(slice_rows<T>(q_, bh)), k(slice_rows<T>(k_, bh)), v(slice_rows<T>(v_, bh)), out(slice_rows<T>(out_, bh)),
        lse(lse_.data_ptr<float>() + bh * q_.size(2)) {}
};

// Gathers the keys [from, to) of the group into rows of ks and vs and columns of kt (K^T).
template <typename T>
void gather_kv(const Chunk& c, int64_t group, const Slice<T>& x, int64_t from, int64_t to, float* ks, float* kt,
               float* vs) {
  gather_keys(c, group, x.k, from, to, ks);
  transpose(ks + from * c.d, to - from, c.d, kt + from, c.s);
  gather_keys(c, group, x.v, from, to, vs);
}

template <typename T>
void forward_slice(const Chunk& c, const Slice<T>& x, Scratch& m) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  float *xq = m.get(m.xq, c.lq * c.d), *ks = m.get(m.ks, c.s * c.d), *kt = m.get(m.kt, c.d * c.s),
        *vs = m.get(m.vs, c.s * c.d), *p = m.get(m.p, c.lq * c.s), *o = m.get(m.o, c.lq * c.d),
        *inv = m.get(m.inv, c.lq);
  gather_kv(c, 0, x, 0, c.a, ks, kt, vs);  // the shared keys, once per slice
  for (int64_t group = 0; group < c.g; group++) {
    gather_kv(c, group, x, c.a, c.s, ks, kt, vs);
    gather_queries(c, group, x.q, scale, xq);
    matmul(c.lq, c.s, c.d, xq, kt, p);
    add_bias(c, group, p);
    for (int64_t i = 0; i < c.lq; i++) {  // unnormalised probabilities; O is scaled instead
      float* row = p + i * c.s;
      const float top = row_max(row, c.s);
      const float sum = top == kNegInf ? 0.0f : exp_sum(row, c.s, top);  // -inf: a padding row
      if (sum == 0.0f) std::fill(row, row + c.s, 0.0f);
      inv[i] = sum == 0.0f ? 0.0f : 1.0f / sum;
      const int64_t pos = c.query(group, i);
      if (c.valid(pos)) x.lse[pos] = top + std::log(sum);
    }
    matmul(c.lq, c.d, c.s, p, vs, o);
    for (int64_t i = 0; i < c.lq; i++) {
      const int64_t pos = c.query(group, i);
      if (!c.valid(pos)) continue;
      T* dst = x.out.row(pos);
      for (int64_t e = 0; e < c.d; e++) dst[e] = static_cast<T>(o[i * c.d + e] * inv[i]);
    }
  }
}

// The backward works on transposed scores, (s x lq): P^T and dS^T then feed dV = P^T dO and
// dK = dS^T Q directly; what is transposed is Q and dO (lq x d) and, for dQ, the keys (s x d),
// never the scores.
// dq_slice rows are stored (each query is in exactly one group); dk, dv rows accumulate. The
// shared keys' gradients accumulate over the groups in scratch and are added once.
template <typename T>
void backward_slice(const Chunk& c, const Slice<T>& x, const Rows<T>& grad, float* dq_slice, float* dk_slice,
                    float* dv_slice, Scratch& m) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  float *xq = m.get(m.xq, c.lq * c.d), *xq_t = m.get(m.xq_t, c.d * c.lq), *d_out = m.get(m.d_out, c.lq * c.d),
        *d_out_t = m.get(m.d_out_t, c.d * c.lq), *ks = m.get(m.ks, c.s * c.d), *kt = m.get(m.kt, c.d * c.s),
        *vs = m.get(m.vs, c.s * c.d), *p_t = m.get(m.p, c.s * c.lq), *ds_t = m.get(m.dp, c.s * c.lq),
        *part = m.get(m.o, std::max(c.s, c.lq) * c.d), *lse_q = m.get(m.lse_q, c.lq),
        *delta = m.get(m.delta, c.lq), *dk_shared = m.get(m.dk_shared, c.a * c.d),
        *dv_shared = m.get(m.dv_shared, c.a * c.d);
  gather_kv(c, 0, x, 0, c.a, ks, kt, vs);
  std::fill(dk_shared, dk_shared + c.a * c.d, 0.0f);
  std::fill(dv_shared, dv_shared + c.a * c.d, 0.0f);
  for (int64_t group = 0; group < c.g; group++) {
    gather_kv(c, group, x, c.a, c.s, ks, kt, vs);
    gather_queries(c, group, x.q, scale, xq);
    gather_queries(c, group, grad, 1.0f, d_out);
    transpose(xq, c.lq, c.d, xq_t, c.lq);
    transpose(d_out, c.lq, c.d, d_out_t, c.lq);
    // per query: its log-sum-exp (+inf for padding: no probability) and rowsum(dO * O)
    for (int64_t i = 0; i < c.lq; i++) {
      const int64_t pos = c.query(group, i);
      const bool live = c.valid(pos) && x.lse[pos] != kNegInf;
      lse_q[i] = live ? x.lse[pos] : std::numeric_limits<float>::infinity();
      float dot = 0.0f;
      if (live) {
        const T* o = x.out.row(pos);
        const float* d_row = d_out + i * c.d;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < c.d; e++) dot += d_row[e] * static_cast<float>(o[e]);
      }
      delta[i] = dot;
    }
    // P^T = exp(K Q^T + bias^T - lse)
    matmul(c.s, c.lq, c.d, ks, xq_t, p_t);
    for (int64_t j = 0; j < c.s; j++) {
      float* row = p_t + j * c.lq;
      if (j >= c.a) {
        const float* bias = c.bias_t + (group * c.ls + j - c.a) * c.lq;
        for (int64_t i = 0; i < c.lq; i++) row[i] += bias[i];
      }
      for (int64_t i = 0; i < c.lq; i++) row[i] -= lse_q[i];
      exp_sum(row, c.lq, 0.0f);
    }
    // dV = P^T dO
    matmul(c.a, c.d, c.lq, p_t, d_out, dv_shared, true);
    matmul(c.ls, c.d, c.lq, p_t + c.a * c.lq, d_out, part);
    scatter_add(c, group, c.a, c.s, part, dv_slice);
    // dS^T = P^T * (V dO^T - delta)
    matmul(c.s, c.lq, c.d, vs, d_out_t, ds_t);
    for (int64_t j = 0; j < c.s; j++) {
      float* row = ds_t + j * c.lq;
      const float* p_row = p_t + j * c.lq;
      for (int64_t i = 0; i < c.lq; i++) row[i] = p_row[i] * (row[i] - delta[i]);
    }
    // dK = dS^T (Q * scale)
    matmul(c.a, c.d, c.lq, ds_t, xq, dk_shared, true);
    matmul(c.ls, c.d, c.lq, ds_t + c.a * c.lq, xq, part);
    scatter_add(c, group, c.a, c.s, part, dk_slice);
    // dQ^T = K^T dS^T, times scale
    matmul(c.d, c.lq, c.s, kt, ds_t, part);
    for (int64_t i = 0; i < c.lq; i++) {
      const int64_t pos = c.query(group, i);
      if (!c.valid(pos)) continue;
      float* dst = dq_slice + pos * c.d;
      for (int64_t e = 0; e < c.d; e++) dst[e] = part[e * c.lq + i] * scale;
    }
  }
  scatter_add(c, 0, 0, c.a, dk_shared, dk_slice);
  scatter_add(c, 0, 0, c.a, dv_shared, dv_slice);
}

// One task per (b, h) slice, each running every chunk: one fork and join per call.
template <typename T>
void forward_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                 const at::Tensor& lse, const std::vector<Chunk>& chunks) {
  at::parallel_for(0, q.size(0) * q.size(1), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t bh = begin; bh < end; bh++) {
      const Slice<T> x(q, k, v, out, lse, bh);
      for (const auto& c : chunks) forward_slice(c, x, scratch);
    }
  });
}

template <typename T>
void backward_all(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, const std::vector<Chunk>& chunks,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const int64_t slice = q.size(2) * q.size(3);
  at::parallel_for(0, q.size(0) * q.size(1), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t bh = begin; bh < end; bh++) {
      const Slice<T> x(q, k, v, out, lse, bh);
      const Rows<T> g = slice_rows<T>(grad, bh);
      float *dq_slice = dq.data_ptr<float>() + bh * slice, *dk_slice = dk.data_ptr<float>() + bh * slice,
            *dv_slice = dv.data_ptr<float>() + bh * slice;
      for (const auto& c : chunks) backward_slice(c, x, g, dq_slice, dk_slice, dv_slice, scratch);
    }
  });
}

// Rows are read as d contiguous elements; a stride along a dimension of size 1 is never used.
bool unit_stride_in_d(const at::Tensor& x) { return x.size(3) == 1 || x.stride(3) == 1; }

std::vector<Chunk> make_chunks(const at::Tensor& q, const at::TensorList shared, const at::TensorList queries,
                               const at::TensorList keys, const at::TensorList bias, const at::TensorList bias_t) {
  TORCH_CHECK(q.dim() == 4 && q.size(3) > 0 && unit_stride_in_d(q),
              "grouped attention: q, k, v must be (b, h, n, d), d > 0, unit stride in d");
  const size_t count = shared.size();
  TORCH_CHECK(queries.size() == count && keys.size() == count && bias.size() == count && bias_t.size() == count,
              "grouped attention: one shared, queries, keys, bias and bias_t tensor per chunk");
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < count; i++) {
    for (const auto* t : {&shared[i], &queries[i], &keys[i], &bias[i], &bias_t[i]})
      TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "grouped attention: plan tensors must be contiguous, on CPU");
    const int64_t g = queries[i].size(0), lq = queries[i].size(1), ls = keys[i].size(1);
    TORCH_CHECK(shared[i].scalar_type() == at::kLong && queries[i].scalar_type() == at::kLong &&
                    keys[i].scalar_type() == at::kLong && keys[i].size(0) == g,
                "grouped attention: shared (a,), queries (g, q) and keys (g, s) must be int64");
    TORCH_CHECK(bias[i].scalar_type() == at::kFloat && bias[i].sizes() == at::IntArrayRef({g, lq, ls}) &&
                    bias_t[i].scalar_type() == at::kFloat && bias_t[i].sizes() == at::IntArrayRef({g, ls, lq}),
                "grouped attention: bias must be float32 (g, q, s) and bias_t its (g, s, q) transpose");
    chunks.emplace_back(q.size(2), q.size(3), shared[i], queries[i], keys[i], bias[i], bias_t[i]);
  }
  return chunks;
}

void check_like_q(const at::Tensor& q, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.sizes() == q.sizes() && x.scalar_type() == q.scalar_type() && unit_stride_in_d(x),
              "grouped attention: ", name, " must match q in shape and dtype, unit stride in d");
}

// Writes out (b, h, n, d) and lse (b, h, n), fp32) at every query of the chunks.
void grouped_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::TensorList shared,
                     at::TensorList queries, at::TensorList keys, at::TensorList bias, at::TensorList bias_t, at::Tensor out, at::Tensor lse) {
  const auto chunks = make_chunks(q, shared, queries, keys, bias, bias_t);
  check_like_q(q, k, "k");
  check_like_q(q, v, "v");
  check_like_q(q, out, "out");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "grouped attention: lse must be contiguous float32 (b, h, n)");
  AT_DISPATCH_SWITCH(q.scalar_type(), "grouped_forward",
      AT_DISPATCH_CASE(at::kFloat, [&] { forward_all<scalar_t>(q, k, v, out, lse, chunks); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { forward_all<scalar_t>(q, k, v, out, lse, chunks); }));
}

// Writes dq and adds into dk, dv (contiguous fp32, (b, h, n, d)).
void grouped_backward(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, at::TensorList shared, at::TensorList queries,
                      at::TensorList keys, at::TensorList bias, at::TensorList bias_t, at::Tensor dq, at::Tensor dk,
                      at::Tensor dv) {
  const auto chunks = make_chunks(q, shared, queries, keys, bias, bias_t);
  check_like_q(q, grad, "grad");
  for (const auto* acc : {&dq, &dk, &dv})
    TORCH_CHECK(acc->is_contiguous() && acc->scalar_type() == at::kFloat && acc->sizes() == q.sizes(),
                "grouped attention: dq, dk, dv must be contiguous float32 of q's shape");
  AT_DISPATCH_SWITCH(q.scalar_type(), "grouped_backward",
      AT_DISPATCH_CASE(at::kFloat, [&] { backward_all<scalar_t>(grad, q, k, v, out, lse, chunks, dq, dk, dv); })
      AT_DISPATCH_CASE(at::kBFloat16, [&] { backward_all<scalar_t>(grad, q, k, v, out, lse, chunks, dq, dk, dv); }));
}

}  // namespace

TORCH_LIBRARY(dalle_ds_attention, m) {
  m.def("grouped_forward(Tensor q, Tensor k, Tensor v, Tensor[] shared, Tensor[] queries, Tensor[] keys, "
        "Tensor[] bias, Tensor[] bias_t, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def("grouped_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor[] shared, "
        "Tensor[] queries, Tensor[] keys, Tensor[] bias, Tensor[] bias_t, Tensor(a!) dq, Tensor(b!) dk, "
        "Tensor(c!) dv) -> ()");
}

TORCH_LIBRARY_IMPL(dalle_ds_attention, CPU, m) {
  m.impl("grouped_forward", &grouped_forward);
  m.impl("grouped_backward", &grouped_backward);
}
