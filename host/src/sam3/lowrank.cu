// lorahost's LoRA kernels: an adapter's down-projection h = drop(act(x))·Aᵀ (forward), its
// factor's gradient dA = gᵀ·drop(act(x)) and the layer's input gradient
// (d1 + drop(g·A)) ⊙ act'(x) (backward), on the tensor cores (mma.sync m16n8k16, bf16 in, f32
// accumulation), drawing the dropout mask as they go. Composed, each wrote an operand as
// large as x (4736 wide before fc2) for another kernel to read back: the dropped-out input
// drop(act(x)), or the adapter's part g·A of the input gradient. Compiled by NVRTC after cuda_kernels::PRELUDE, cuda_kernels::TENSOR_CORE
// and fused_cuda::HELPERS (act_f, the dropout generator's draws and kept); also compiled as plain
// C++ by the CPU emulation test (host/tests/cuda_emu.rs).
//
// x (rows, k) and A (r, k) are row-major bf16 with k even and 4-byte aligned rows, so that two
// neighbouring entries of a row are one 32-bit word and one draw of the generator (entries 2j
// and 2j + 1 share a hash). The mask and act are those of fused_cuda's act_drop: entry i of x
// becomes bf16(act(x_i) · scale) where kept, else 0.

#define LR_THREADS 128

// Entries (c, c + 1) of row `row` of the adapter's input as a bf16 pair: act, dropout, scale.
__device__ __forceinline__ unsigned lr_pair(const bf16_t* x, int k, long long row, int c, const unsigned char* mask,
        unsigned long long key, unsigned threshold, float scale, int act) {
    const long long i = row * k + c;
    const unsigned v = tc_ld32(x + i);
    const float a0 = act_f(act, __uint_as_float(v << 16)), a1 = act_f(act, __uint_as_float(v & 0xffff0000u));
    const unsigned bits = draws(mask, key, threshold, i >> 1);
    return pack_bf16(kept(mask, bits, threshold, i) ? a0 * scale : 0.f,
        kept(mask, bits, threshold, i + 1) ? a1 * scale : 0.f);
}

// h (rows, r) = drop(act(x)) · Aᵀ, r <= 8·NT. One block of 4 warps per 16 rows: warp w takes the
// 16-wide k-chunks w, w + 4, ... and the block sums the four partial products (a whole row of
// x per warp would leave too few warps to hide the loads' latency at SAM3's sizes).
template <int NT>
__device__ void lr_down(const bf16_t* __restrict__ x, const bf16_t* __restrict__ a, bf16_t* __restrict__ h,
        long long rows, int k, int r, const unsigned char* mask, unsigned long long key, unsigned threshold,
        float scale, int act) {
    __shared__ float part[3][NT][4][32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long r0 = (long long)blockIdx.x * 16 + g, r1 = r0 + 8;
    float acc[NT][4];
    tc_zero<NT>(acc);
    const int chunks = (k + 15) / 16;
    // Two chunks per iteration: the second's loads are in flight while the first multiplies.
#pragma unroll 2
    for (int kk = warp; kk < chunks; kk += 4) {
        const int c0 = kk * 16 + 2 * t, c1 = c0 + 8;
        unsigned fa[4];
        fa[0] = (r0 < rows && c0 < k) ? lr_pair(x, k, r0, c0, mask, key, threshold, scale, act) : 0u;
        fa[1] = (r1 < rows && c0 < k) ? lr_pair(x, k, r1, c0, mask, key, threshold, scale, act) : 0u;
        fa[2] = (r0 < rows && c1 < k) ? lr_pair(x, k, r0, c1, mask, key, threshold, scale, act) : 0u;
        fa[3] = (r1 < rows && c1 < k) ? lr_pair(x, k, r1, c1, mask, key, threshold, scale, act) : 0u;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int n = nt * 8 + g;
            unsigned fb[2];
            fb[0] = (n < r && c0 < k) ? tc_ld32(a + (long long)n * k + c0) : 0u;
            fb[1] = (n < r && c1 < k) ? tc_ld32(a + (long long)n * k + c1) : 0u;
            mma16816(acc[nt], fa, fb);
        }
    }
    if (warp > 0) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[warp - 1][nt][e][lane] = acc[nt][e];
    }
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] += part[0][nt][e][lane] + part[1][nt][e][lane] + part[2][nt][e][lane];
        const int n = nt * 8 + 2 * t;
        // c0, c1: row r0, columns n and n + 1; c2, c3: row r1.
        if (r0 < rows && n < r) st(h, r0 * r + n, acc[nt][0]);
        if (r0 < rows && n + 1 < r) st(h, r0 * r + n + 1, acc[nt][1]);
        if (r1 < rows && n < r) st(h, r1 * r + n, acc[nt][2]);
        if (r1 < rows && n + 1 < r) st(h, r1 * r + n + 1, acc[nt][3]);
    }
}

// One chunk of rows of dA = gᵀ · drop(act(x)) for g (rows, r), r <= 16·MT and even: out (r, k)
// f32 (the chunk's slice of the partial sums, or dA itself when there is one chunk) over rows
// [chunk·rc, chunk·rc + rc). Grid (ceil(k / 64), chunks); each warp owns 16 of the block's 64
// columns for every row of dA. Both operands go through shared memory: the dropped-out x as
// 32 × 64 tiles drawn pair by pair, g as 32 × r tiles.
template <int MT>
__device__ void lr_grad_a(const bf16_t* __restrict__ gr, const bf16_t* __restrict__ x, float* __restrict__ out,
        long long rows, int k, int r, long long rc, const unsigned char* mask, unsigned long long key,
        unsigned threshold, float scale, int act) {
    __shared__ __align__(16) bf16_t gs[32][MT * 16 + 8];
    __shared__ __align__(16) bf16_t xs[32][64 + 8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 64;
    const long long begin = (long long)blockIdx.y * rc;
    const long long end = begin + rc < rows ? begin + rc : rows;
    float acc[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) tc_zero<2>(acc[mt]);
    for (long long r0 = begin; r0 < end; r0 += 32) {
        for (int e = threadIdx.x; e < 32 * MT * 8; e += LR_THREADS) {
            const int row = e / (MT * 8), c = (e % (MT * 8)) * 2;
            *(unsigned*)&gs[row][c] = (r0 + row < end && c < r) ? tc_ld32(gr + (r0 + row) * r + c) : 0u;
        }
        for (int e = threadIdx.x; e < 32 * 32; e += LR_THREADS) {
            const int row = e >> 5, c = (e & 31) * 2;
            *(unsigned*)&xs[row][c] = (r0 + row < end && col0 + c < k)
                ? lr_pair(x, k, r0 + row, col0 + c, mask, key, threshold, scale, act) : 0u;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            unsigned fb[4];
            tc_b_kn<64 + 8>(fb, xs, warp * 16, kk, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                unsigned fa[4];
                tc_a_km<MT * 16 + 8>(fa, gs, mt * 16, kk, lane);
                mma16816(acc[mt][0], fa, fb);
                mma16816(acc[mt][1], fa, fb + 2);
            }
        }
        __syncthreads();
    }
    out += (long long)blockIdx.y * r * k;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int j0 = mt * 16 + g, j1 = j0 + 8, c = col0 + warp * 16 + hh * 8 + 2 * t;
            if (j0 < r && c < k) out[(long long)j0 * k + c] = acc[mt][hh][0];
            if (j0 < r && c + 1 < k) out[(long long)j0 * k + c + 1] = acc[mt][hh][1];
            if (j1 < r && c < k) out[(long long)j1 * k + c] = acc[mt][hh][2];
            if (j1 < r && c + 1 < k) out[(long long)j1 * k + c + 1] = acc[mt][hh][3];
        }
}

// dx (rows, k) = (d1 + drop(g · A)) ⊙ act'(x): an adapted linear's input gradient, the adapter's
// part g·A (g (rows, r), A (r, k), r <= 16·KT) multiplied on the tensor cores tile by tile and
// never written (composed: a product writing it, rounded to bf16, for the elementwise kernel
// to read back); x is read only with an activation (act 0: none). Grid (ceil(k / 64),
// ceil(rows / 64)): a block of 4 warps owns 64 rows × 64 columns, a warp 16 rows.
template <int KT>
__device__ void lr_input_grad(const bf16_t* __restrict__ d1, const bf16_t* __restrict__ g,
        const bf16_t* __restrict__ a, const bf16_t* __restrict__ x, bf16_t* __restrict__ dx, long long rows, int k,
        int r, const unsigned char* mask, unsigned long long key, unsigned threshold, float scale, int act) {
    __shared__ __align__(16) bf16_t as[KT * 16][64 + 8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 64;
    for (int e = threadIdx.x; e < KT * 16 * 32; e += LR_THREADS) {
        const int j = e >> 5, c = (e & 31) * 2;
        *(unsigned*)&as[j][c] = (j < r && col0 + c < k) ? tc_ld32(a + (long long)j * k + col0 + c) : 0u;
    }
    __syncthreads();
    const long long r0 = (long long)blockIdx.y * 64 + warp * 16 + gr, r1 = r0 + 8;
    float acc[8][4];
    tc_zero<8>(acc);
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
        const int c0 = kk * 16 + 2 * t, c1 = c0 + 8;
        unsigned fa[4];
        fa[0] = (r0 < rows && c0 < r) ? tc_ld32(g + r0 * r + c0) : 0u;
        fa[1] = (r1 < rows && c0 < r) ? tc_ld32(g + r1 * r + c0) : 0u;
        fa[2] = (r0 < rows && c1 < r) ? tc_ld32(g + r0 * r + c1) : 0u;
        fa[3] = (r1 < rows && c1 < r) ? tc_ld32(g + r1 * r + c1) : 0u;
#pragma unroll
        for (int nt = 0; nt < 8; nt += 2) {
            unsigned fb[4];
            tc_b_kn<64 + 8>(fb, as, nt * 8, kk, lane);
            mma16816(acc[nt], fa, fb);
            mma16816(acc[nt + 1], fa, fb + 2);
        }
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        const int c = col0 + nt * 8 + 2 * t;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const long long row = half ? r1 : r0;
            if (row >= rows || c >= k) continue;
            // Entries c and c + 1 of the row: one word of each operand, one draw.
            const long long i = row * k + c;
            const unsigned bits = draws(mask, key, threshold, i >> 1);
            const unsigned dv = tc_ld32(d1 + i);
            float v0 = __uint_as_float(dv << 16) + (kept(mask, bits, threshold, i) ? acc[nt][2 * half] * scale : 0.f);
            float v1 = __uint_as_float(dv & 0xffff0000u)
                + (kept(mask, bits, threshold, i + 1) ? acc[nt][2 * half + 1] * scale : 0.f);
            if (act) {
                const unsigned xv = tc_ld32(x + i);
                v0 *= act_d(act, __uint_as_float(xv << 16));
                v1 *= act_d(act, __uint_as_float(xv & 0xffff0000u));
            }
            *(unsigned*)(dx + i) = pack_bf16(v0, v1);
        }
    }
}

// out[i] = Σ over the chunks of part[chunk · n + i] (the chunks' partial dA, summed in order).
extern "C" __global__ void lr_sum(const float* __restrict__ part, float* __restrict__ out, long long n, int chunks) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int c = 0; c < chunks; ++c) s += part[(long long)c * n + i];
        out[i] = s;
    }
}

#define LR_MASK const unsigned char *mask, unsigned long long key, unsigned threshold, float scale
#define LR_DOWN(NT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lr_down_##NT(const bf16_t* x, const bf16_t* a,  \
            bf16_t* h, long long rows, int k, int r, LR_MASK, int act) {                                     \
        lr_down<NT>(x, a, h, rows, k, r, mask, key, threshold, scale, act);                                  \
    }
#define LR_GRAD_A(MT)                                                                                        \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lr_grad_a_##MT(const bf16_t* g, const bf16_t* x, \
            float* out, long long rows, int k, int r, long long rc, LR_MASK, int act) {                     \
        lr_grad_a<MT>(g, x, out, rows, k, r, rc, mask, key, threshold, scale, act);                          \
    }
#define LR_INPUT_GRAD(KT)                                                                                    \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lr_input_grad_##KT(const bf16_t* d1,             \
            const bf16_t* g, const bf16_t* a, const bf16_t* x, bf16_t* dx, long long rows, int k, int r,      \
            LR_MASK, int act) {                                                                              \
        lr_input_grad<KT>(d1, g, a, x, dx, rows, k, r, mask, key, threshold, scale, act);                     \
    }
LR_DOWN(2)
LR_DOWN(4)
LR_DOWN(8)
LR_GRAD_A(1)
LR_GRAD_A(2)
LR_GRAD_A(4)
LR_INPUT_GRAD(1)
LR_INPUT_GRAD(2)
LR_INPUT_GRAD(4)
