// lorahost flash attention: softmax(q kᵀ · scale) v on bf16 operands with f32 accumulation on
// the tensor cores (mma.sync m16n8k16), forward and backward, never materialising a score matrix.
// Compiled by NVRTC after cuda_kernels::PRELUDE (bf16_t, ld) and cuda_kernels::TENSOR_CORE (mma,
// ldmatrix, fragment loads). Also compiled as plain C++ by the CPU emulation test
// (host/tests/cuda_emu.rs), which brings its own mma, ldmatrix and shuffles.
//
// Operands are (B, H, N, HD) views given by element strides (batch, head, token); the head
// dimension is contiguous. Every base address is 16-byte aligned and every stride a multiple of
// 8 elements (the host checks, and copies otherwise). One block of 128 threads (4 warps) owns
// 64 rows (queries in the forward and the dQ pass, keys in the dK/dV pass); each warp owns 16.
// The log-sum-exp of each query row is kept in base 2 (scores pre-multiplied by scale · log2 e).

#define FA_ROWS 64
#define FA_COLS 64
#define FA_PAD 8
#define FA_THREADS 128

__device__ __forceinline__ float fa_neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// A-operand fragments of rows r0 = row0 + g and r1 = r0 + 8 of a (rows, HD) view (zero past n).
template <int HD>
__device__ __forceinline__ void fa_load_a(unsigned (*f)[4], const bf16_t* p, long long sn, int row0, int n, int g, int t) {
    const int r0 = row0 + g, r1 = r0 + 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        const int c = kk * 16 + t * 2;
        f[kk][0] = r0 < n ? tc_ld32(p + r0 * sn + c) : 0u;
        f[kk][1] = r1 < n ? tc_ld32(p + r1 * sn + c) : 0u;
        f[kk][2] = r0 < n ? tc_ld32(p + r0 * sn + c + 8) : 0u;
        f[kk][3] = r1 < n ? tc_ld32(p + r1 * sn + c + 8) : 0u;
    }
}

// Rows row0 .. row0 + 64 of a (rows, HD) view into shared memory (zero past n) as cp.async
// copies (tc_cp16; complete at the caller's tc_cp_wait).
template <int HD>
__device__ __forceinline__ void fa_load_tile_async(bf16_t (*sm)[HD + FA_PAD], const bf16_t* p, long long sn, int row0, int n) {
    for (int i = threadIdx.x; i < FA_COLS * HD / 8; i += FA_THREADS) {
        const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        const bool in = row0 + r < n;
        tc_cp16(&sm[r][c], in ? p + (row0 + r) * sn + c : p, in);
    }
}

// The loader of the key loops (forward, dQ): key tile `at` and its value tile into buffer `buf`.
template <int HD>
__device__ __forceinline__ auto fa_kv_loader(bf16_t (*ks)[FA_COLS][HD + FA_PAD], bf16_t (*vs)[FA_COLS][HD + FA_PAD],
        const bf16_t* kp, long long k_sn, const bf16_t* vp, long long v_sn, int nk) {
    return [=](int buf, int at) {
        fa_load_tile_async<HD>(ks[buf], kp, k_sn, at, nk);
        fa_load_tile_async<HD>(vs[buf], vp, v_sn, at, nk);
    };
}

// The key loop's pipeline. STAGES 2: tile t + 1's copies (cp.async) are in flight while tile t
// is multiplied, in the other of two shared buffers; STAGES 1: each tile is loaded, then
// multiplied. Call fa_pipe_start once, then fa_pipe_next at the top of each iteration `it`
// (the tile's buffer: it & 1 with two stages) with `load(buffer, row0)` issuing one tile's
// copies, and fa_pipe_end at the bottom.
template <int STAGES, typename Load>
__device__ __forceinline__ void fa_pipe_start(Load load) {
    if (STAGES == 2) {
        load(0, 0);
        tc_cp_commit();
    }
}
template <int STAGES, typename Load>
__device__ __forceinline__ int fa_pipe_next(Load load, int it, int tiles) {
    if (STAGES == 1) {
        __syncthreads();
        load(0, it * FA_COLS);
        tc_cp_commit();
        tc_cp_wait<0>();
        __syncthreads();
        return 0;
    }
    const int buf = it & 1;
    // The other buffer was last read in iteration it - 1, which every warp has left (the
    // barrier at its end).
    if (it + 1 < tiles) load(buf ^ 1, (it + 1) * FA_COLS);
    tc_cp_commit();
    tc_cp_wait<1>();
    __syncthreads();
    return buf;
}
template <int STAGES>
__device__ __forceinline__ void fa_pipe_end() {
    if (STAGES == 2) __syncthreads();
}

// A-operand fragment (16 rows × 16 k) from accumulator tiles 2kk and 2kk+1 (C layout).
__device__ __forceinline__ void fa_c_to_a(unsigned* a, const float* c0, const float* c1) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// c (16 rows × 64 columns, 8 accumulator tiles) = a · sᵀ: a the warp's 16 rows × HD as A
// fragments, s a shared 64 × HD tile stored [column][k].
template <int HD>
__device__ __forceinline__ void fa_mma_nk(float (*c)[4], const unsigned (*a)[4], bf16_t (*s)[HD + FA_PAD], int lane) {
    tc_zero<FA_COLS / 8>(c);
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
        for (int j = 0; j < FA_COLS / 8; j += 2) {
            unsigned bb[4];
            tc_b_nk(bb, s, j * 8, kk, lane);
            mma16816(c[j], a[kk], bb);
            mma16816(c[j + 1], a[kk], bb + 2);
        }
    }
}

// acc (16 rows × HD) += p · s: p 16 rows × 64 in accumulator layout (rounded to bf16 on the way),
// s a shared 64 × HD tile stored [k][column].
template <int HD>
__device__ __forceinline__ void fa_mma_kn(float (*acc)[4], const float (*p)[4], bf16_t (*s)[HD + FA_PAD], int lane) {
#pragma unroll
    for (int kk = 0; kk < FA_COLS / 16; ++kk) {
        unsigned pa[4];
        fa_c_to_a(pa, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int nt = 0; nt < HD / 8; nt += 2) {
            unsigned bb[4];
            tc_b_kn(bb, s, nt * 8, kk, lane);
            mma16816(acc[nt], pa, bb);
            mma16816(acc[nt + 1], pa, bb + 2);
        }
    }
}

// Rows r0 = row0 + g and r1 = r0 + 8 of a (rows, HD) output from accumulators times `mul`
// (rows past n skipped).
template <int HD>
__device__ __forceinline__ void fa_store(bf16_t* p, long long sn, const float (*acc)[4], int row0, int n,
        float mul0, float mul1, int g, int t) {
    const int r0 = row0 + g, r1 = r0 + 8;
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
        const int c = nt * 8 + t * 2;
        if (r0 < n) *(unsigned*)(p + r0 * sn + c) = pack_bf16(acc[nt][0] * mul0, acc[nt][1] * mul0);
        if (r1 < n) *(unsigned*)(p + r1 * sn + c) = pack_bf16(acc[nt][2] * mul1, acc[nt][3] * mul1);
    }
}

#define FA_VIEW(x) const bf16_t* __restrict__ x, long long x##_sb, long long x##_sh, long long x##_sn
#define FA_OUT(x) bf16_t* __restrict__ x, long long x##_sb, long long x##_sh, long long x##_sn
#define FA_AT(x, b, h) (x + (b) * x##_sb + (h) * x##_sh)

// Forward: o = softmax(q kᵀ · scale) v and lse2 = log2 Σ exp2(s · scale · log2 e), one block
// per 64 queries of one (batch, head): grid (ceil(nq / 64), B · H).
template <int HD, int STAGES>
__device__ void fa_forward(FA_VIEW(q), FA_VIEW(k), FA_VIEW(v), FA_OUT(o), float* __restrict__ lse,
        int heads, int nq, int nk, float sl2) {
    __shared__ __align__(16) bf16_t ks[STAGES][FA_COLS][HD + FA_PAD];
    __shared__ __align__(16) bf16_t vs[STAGES][FA_COLS][HD + FA_PAD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int row0 = blockIdx.x * FA_ROWS + warp * 16;
    const bf16_t* qp = FA_AT(q, b, h);
    const bf16_t* kp = FA_AT(k, b, h);
    const bf16_t* vp = FA_AT(v, b, h);
    unsigned qf[HD / 16][4];
    fa_load_a<HD>(qf, qp, q_sn, row0, nq, g, t);
    float acc[HD / 8][4];
    tc_zero<HD / 8>(acc);
    float m0 = fa_neg_inf(), m1 = fa_neg_inf(), l0 = 0.f, l1 = 0.f;
    const auto load = fa_kv_loader<HD>(ks, vs, kp, k_sn, vp, v_sn, nk);
    const int tiles = (nk + FA_COLS - 1) / FA_COLS;
    fa_pipe_start<STAGES>(load);
    for (int it = 0; it < tiles; ++it) {
        const int k0 = it * FA_COLS;
        const int buf = fa_pipe_next<STAGES>(load, it, tiles);
        float s[FA_COLS / 8][4];
        fa_mma_nk<HD>(s, qf, ks[buf], lane);
        float x0 = fa_neg_inf(), x1 = fa_neg_inf();
#pragma unroll
        for (int j = 0; j < FA_COLS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = k0 + j * 8 + t * 2 + (e & 1);
                const float x = col < nk ? s[j][e] * sl2 : fa_neg_inf();
                s[j][e] = x;
                if (e < 2) x0 = fmaxf(x0, x); else x1 = fmaxf(x1, x);
            }
        }
        // Every tile holds at least one valid key, so the new maxima are finite.
        const float n0 = fmaxf(m0, fa_quad_max(x0)), n1 = fmaxf(m1, fa_quad_max(x1));
        const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
        m0 = n0;
        m1 = n1;
        l0 *= a0;
        l1 *= a1;
#pragma unroll
        for (int nt = 0; nt < HD / 8; ++nt) {
            acc[nt][0] *= a0; acc[nt][1] *= a0; acc[nt][2] *= a1; acc[nt][3] *= a1;
        }
#pragma unroll
        for (int j = 0; j < FA_COLS / 8; ++j) {
            s[j][0] = exp2f(s[j][0] - m0); s[j][1] = exp2f(s[j][1] - m0);
            s[j][2] = exp2f(s[j][2] - m1); s[j][3] = exp2f(s[j][3] - m1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
        fa_mma_kn<HD>(acc, s, vs[buf], lane);
        fa_pipe_end<STAGES>();
    }
    l0 = fa_quad_sum(l0);
    l1 = fa_quad_sum(l1);
    fa_store<HD>(FA_AT(o, b, h), o_sn, acc, row0, nq, 1.f / l0, 1.f / l1, g, t);
    if (t == 0) {
        const int r0 = row0 + g, r1 = r0 + 8;
        if (r0 < nq) lse[(long long)bh * nq + r0] = m0 + log2f(l0);
        if (r1 < nq) lse[(long long)bh * nq + r1] = m1 + log2f(l1);
    }
}

// delta = rowsum(dO ⊙ O) in f32, one warp per query row of B · H · nq rows.
extern "C" __global__ void fa_delta(FA_VIEW(o), FA_VIEW(d), float* __restrict__ delta, int heads, int nq, int hd,
        long long rows) {
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const long long bh = row / nq;
    const int i = (int)(row % nq), b = (int)(bh / heads), h = (int)(bh % heads);
    const bf16_t* op = FA_AT(o, b, h) + i * o_sn;
    const bf16_t* dp = FA_AT(d, b, h) + i * d_sn;
    float s = 0.f;
    for (int c = lane; c < hd; c += 32) s += ld(op, c) * ld(dp, c);
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (lane == 0) delta[row] = s;
}

// dK and dV of 64 keys of one (batch, head), looping over all queries: grid (ceil(nk / 64), B · H).
// Each warp computes Sᵀ (its 16 keys × 64 queries) and dPᵀ = V dOᵀ, then
// dV += Pᵀ dO and dK += scale · dSᵀ Q with dSᵀ = Pᵀ ⊙ (dPᵀ − δ).
template <int HD, int STAGES>
__device__ void fa_backward_kv(FA_VIEW(q), FA_VIEW(k), FA_VIEW(v), FA_VIEW(d), const float* __restrict__ lse,
        const float* __restrict__ delta, FA_OUT(dk), FA_OUT(dv), int heads, int nq, int nk, float sl2, float scale) {
    __shared__ __align__(16) bf16_t qs[STAGES][FA_COLS][HD + FA_PAD];
    __shared__ __align__(16) bf16_t ds[STAGES][FA_COLS][HD + FA_PAD];
    __shared__ float ls[STAGES][FA_COLS], dl[STAGES][FA_COLS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int row0 = blockIdx.x * FA_ROWS + warp * 16;
    const bf16_t* qp = FA_AT(q, b, h);
    const bf16_t* dp = FA_AT(d, b, h);
    unsigned kf[HD / 16][4], vf[HD / 16][4];
    fa_load_a<HD>(kf, FA_AT(k, b, h), k_sn, row0, nk, g, t);
    fa_load_a<HD>(vf, FA_AT(v, b, h), v_sn, row0, nk, g, t);
    float dka[HD / 8][4], dva[HD / 8][4];
    tc_zero<HD / 8>(dka);
    tc_zero<HD / 8>(dva);
    const auto load = [&](int buf, int q0) {
        fa_load_tile_async<HD>(qs[buf], qp, q_sn, q0, nq);
        fa_load_tile_async<HD>(ds[buf], dp, d_sn, q0, nq);
        for (int i = threadIdx.x; i < FA_COLS; i += FA_THREADS) {
            const bool in = q0 + i < nq;
            // Past the last query: lse +inf gives P = 0.
            ls[buf][i] = in ? lse[(long long)bh * nq + q0 + i] : __int_as_float(0x7f800000);
            dl[buf][i] = in ? delta[(long long)bh * nq + q0 + i] : 0.f;
        }
    };
    const int tiles = (nq + FA_COLS - 1) / FA_COLS;
    fa_pipe_start<STAGES>(load);
    for (int it = 0; it < tiles; ++it) {
        const int buf = fa_pipe_next<STAGES>(load, it, tiles);
        float p[FA_COLS / 8][4], dpt[FA_COLS / 8][4];
        fa_mma_nk<HD>(p, kf, qs[buf], lane);
        fa_mma_nk<HD>(dpt, vf, ds[buf], lane);
#pragma unroll
        for (int j = 0; j < FA_COLS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = j * 8 + t * 2 + (e & 1);
                p[j][e] = exp2f(p[j][e] * sl2 - ls[buf][c]);
                dpt[j][e] = p[j][e] * (dpt[j][e] - dl[buf][c]);
            }
        }
        fa_mma_kn<HD>(dva, p, ds[buf], lane);
        fa_mma_kn<HD>(dka, dpt, qs[buf], lane);
        fa_pipe_end<STAGES>();
    }
    fa_store<HD>(FA_AT(dk, b, h), dk_sn, dka, row0, nk, scale, scale, g, t);
    fa_store<HD>(FA_AT(dv, b, h), dv_sn, dva, row0, nk, 1.f, 1.f, g, t);
}

// dQ of 64 queries of one (batch, head), looping over all keys: grid (ceil(nq / 64), B · H).
// dQ = scale · dS K with dS = P ⊙ (dO Vᵀ − δ), P recomputed from the saved lse.
template <int HD, int STAGES>
__device__ void fa_backward_q(FA_VIEW(q), FA_VIEW(k), FA_VIEW(v), FA_VIEW(d), const float* __restrict__ lse,
        const float* __restrict__ delta, FA_OUT(dq), int heads, int nq, int nk, float sl2, float scale) {
    __shared__ __align__(16) bf16_t ks[STAGES][FA_COLS][HD + FA_PAD];
    __shared__ __align__(16) bf16_t vs[STAGES][FA_COLS][HD + FA_PAD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int row0 = blockIdx.x * FA_ROWS + warp * 16;
    const int r0 = row0 + g, r1 = r0 + 8;
    const bf16_t* kp = FA_AT(k, b, h);
    const bf16_t* vp = FA_AT(v, b, h);
    unsigned qf[HD / 16][4], df[HD / 16][4];
    fa_load_a<HD>(qf, FA_AT(q, b, h), q_sn, row0, nq, g, t);
    fa_load_a<HD>(df, FA_AT(d, b, h), d_sn, row0, nq, g, t);
    const float lse0 = r0 < nq ? lse[(long long)bh * nq + r0] : 0.f;
    const float lse1 = r1 < nq ? lse[(long long)bh * nq + r1] : 0.f;
    const float dl0 = r0 < nq ? delta[(long long)bh * nq + r0] : 0.f;
    const float dl1 = r1 < nq ? delta[(long long)bh * nq + r1] : 0.f;
    float dqa[HD / 8][4];
    tc_zero<HD / 8>(dqa);
    const auto load = fa_kv_loader<HD>(ks, vs, kp, k_sn, vp, v_sn, nk);
    const int tiles = (nk + FA_COLS - 1) / FA_COLS;
    fa_pipe_start<STAGES>(load);
    for (int it = 0; it < tiles; ++it) {
        const int k0 = it * FA_COLS;
        const int buf = fa_pipe_next<STAGES>(load, it, tiles);
        float s[FA_COLS / 8][4], dps[FA_COLS / 8][4];
        fa_mma_nk<HD>(s, qf, ks[buf], lane);
        fa_mma_nk<HD>(dps, df, vs[buf], lane);
#pragma unroll
        for (int j = 0; j < FA_COLS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = k0 + j * 8 + t * 2 + (e & 1);
                const float p = col < nk ? exp2f(s[j][e] * sl2 - (e < 2 ? lse0 : lse1)) : 0.f;
                dps[j][e] = p * (dps[j][e] - (e < 2 ? dl0 : dl1));
            }
        }
        fa_mma_kn<HD>(dqa, dps, ks[buf], lane);
        fa_pipe_end<STAGES>();
    }
    fa_store<HD>(FA_AT(dq, b, h), dq_sn, dqa, row0, nq, scale, scale, g, t);
}

// Each kernel in two builds: the pipelined one (two stages) and, with the suffix _s1, one stage
// (LORAHOST_FLASH_PIPELINE=0, for A/B timings). At head dimension 64 the register caps (minimum
// blocks per SM) keep four forward blocks and three dQ blocks per SM (65,536 registers), as
// before the pipeline, for a few bytes of spills; at 32 the kernels fit without a cap.
#define FA_INSTANCES_AS(HD, STAGES, SUFFIX, FWD_BOUNDS, Q_BOUNDS)                                                                 \
    extern "C" __global__ void __launch_bounds__ FWD_BOUNDS fa_forward_##HD##SUFFIX(FA_VIEW(q), FA_VIEW(k), \
            FA_VIEW(v), FA_OUT(o), float* lse, int heads, int nq, int nk, float sl2) {                       \
        fa_forward<HD, STAGES>(q, q_sb, q_sh, q_sn, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn, o, o_sb, o_sh,   \
            o_sn, lse, heads, nq, nk, sl2);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) fa_backward_kv_##HD##SUFFIX(FA_VIEW(q),          \
            FA_VIEW(k), FA_VIEW(v), FA_VIEW(d), const float* lse, const float* delta, FA_OUT(dk), FA_OUT(dv), \
            int heads, int nq, int nk, float sl2, float scale) {                                            \
        fa_backward_kv<HD, STAGES>(q, q_sb, q_sh, q_sn, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn, d, d_sb,    \
            d_sh, d_sn, lse, delta, dk, dk_sb, dk_sh, dk_sn, dv, dv_sb, dv_sh, dv_sn, heads, nq, nk, sl2,     \
            scale);                                                                                          \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__ Q_BOUNDS fa_backward_q_##HD##SUFFIX(FA_VIEW(q),           \
            FA_VIEW(k), FA_VIEW(v), FA_VIEW(d), const float* lse, const float* delta, FA_OUT(dq), int heads,  \
            int nq, int nk, float sl2, float scale) {                                                       \
        fa_backward_q<HD, STAGES>(q, q_sb, q_sh, q_sn, k, k_sb, k_sh, k_sn, v, v_sb, v_sh, v_sn, d, d_sb,     \
            d_sh, d_sn, lse, delta, dq, dq_sb, dq_sh, dq_sn, heads, nq, nk, sl2, scale);                      \
    }
#define FA_INSTANCES(HD, FWD_BOUNDS, Q_BOUNDS) \
    FA_INSTANCES_AS(HD, 2, , FWD_BOUNDS, Q_BOUNDS) FA_INSTANCES_AS(HD, 1, _s1, FWD_BOUNDS, Q_BOUNDS)

FA_INSTANCES(32, (FA_THREADS), (FA_THREADS))
FA_INSTANCES(64, (FA_THREADS, 4), (FA_THREADS, 3))
