// LayerNorm (ln_*) and GroupNorm (gn_*) kernels, forward and input gradient, for bf16 and f32
// activations with f32 statistics; compiled after cuda_kernels::PRELUDE (see norm_cuda.rs).

template <typename T>
__device__ void row_stats(const T* xr, int c, float eps, float* sh, float* mean, float* rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += ld(xr, i);
    const float m = block_sum(s, sh) / c;
    float q = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) { const float d = ld(xr, i) - m; q += d * d; }
    const float var = block_sum(q, sh) / c;
    *mean = m;
    *rstd = 1.f / sqrtf(var + eps);
}

template <typename T>
__device__ void ln_fwd(const T* x, const float* w, const float* b, T* y, int c, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * c;
    T* yr = y + row * c;
    float mean, rstd;
    row_stats(xr, c, eps, sh, &mean, &rstd);
    for (int i = threadIdx.x; i < c; i += blockDim.x) st(yr, i, (ld(xr, i) - mean) * rstd * w[i] + b[i]);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, xhat = (x - mean) * rstd.
template <typename T>
__device__ void ln_bwd(const T* x, const T* dy, const float* w, T* dx, int c, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * c;
    const T* gr = dy + row * c;
    T* dr = dx + row * c;
    float mean, rstd;
    row_stats(xr, c, eps, sh, &mean, &rstd);
    float s1 = 0.f, s2 = 0.f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float g = ld(gr, i) * w[i];
        s1 += g;
        s2 += g * (ld(xr, i) - mean) * rstd;
    }
    const float m1 = block_sum(s1, sh) / c;
    const float m2 = block_sum(s2, sh) / c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float g = ld(gr, i) * w[i];
        const float xh = (ld(xr, i) - mean) * rstd;
        st(dr, i, (g - m1 - xh * m2) * rstd);
    }
}

// LayerNorm of bf16 rows of c = NC·256 elements, one warp per row (8 rows per 256-thread
// block): each lane holds NC chunks of 8 consecutive elements in registers (16-byte loads and
// stores), so x is read once and the statistics need only warp shuffles. The host picks these
// for 16-byte aligned operands (norm_cuda::layer_launch); the per-row block kernels above take
// every other width and dtype.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ void unpack8(uint4 u, float* f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
// As st(bf16_t*): round to nearest even, NaN kept.
__device__ __forceinline__ unsigned bf16_bits(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 u;
    u.x = bf16_bits(f[0]) | (bf16_bits(f[1]) << 16);
    u.y = bf16_bits(f[2]) | (bf16_bits(f[3]) << 16);
    u.z = bf16_bits(f[4]) | (bf16_bits(f[5]) << 16);
    u.w = bf16_bits(f[6]) | (bf16_bits(f[7]) << 16);
    return u;
}

// The row's values into v, its mean and 1/std.
template <int NC>
__device__ __forceinline__ void warp_row_stats(const uint4* xr, int lane, float eps, float (*v)[8], float* mean,
        float* rstd) {
    const int c = NC * 256;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        unpack8(xr[j * 32 + lane], v[j]);
#pragma unroll
        for (int e = 0; e < 8; ++e) s += v[j][e];
    }
    const float m = warp_sum(s) / c;
    float q = 0.f;
#pragma unroll
    for (int j = 0; j < NC; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float d = v[j][e] - m;
            q += d * d;
        }
    *mean = m;
    *rstd = 1.f / sqrtf(warp_sum(q) / c + eps);
}

template <int NC>
__device__ void ln_fwd_warp(const bf16_t* x, const float* w, const float* b, bf16_t* y, int rows, float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp
    const long long c = NC * 256;
    float v[NC][8], mean, rstd;
    warp_row_stats<NC>((const uint4*)(x + row * c), lane, eps, v, &mean, &rstd);
    uint4* yr = (uint4*)(y + row * c);
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        const int base = (j * 32 + lane) * 8;
        float o[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = (v[j][e] - mean) * rstd * w[base + e] + b[base + e];
        yr[j * 32 + lane] = pack8(o);
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (as ln_bwd).
template <int NC>
__device__ void ln_bwd_warp(const bf16_t* x, const bf16_t* dy, const float* w, bf16_t* dx, int rows, float eps) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // the whole warp
    const long long c = NC * 256;
    float v[NC][8], g[NC][8], mean, rstd;
    warp_row_stats<NC>((const uint4*)(x + row * c), lane, eps, v, &mean, &rstd);
    const uint4* gr = (const uint4*)(dy + row * c);
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        unpack8(gr[j * 32 + lane], g[j]);
        const int base = (j * 32 + lane) * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            g[j][e] *= w[base + e];
            v[j][e] = (v[j][e] - mean) * rstd;
            s1 += g[j][e];
            s2 += g[j][e] * v[j][e];
        }
    }
    const float m1 = warp_sum(s1) / c, m2 = warp_sum(s2) / c;
    uint4* dr = (uint4*)(dx + row * c);
#pragma unroll
    for (int j = 0; j < NC; ++j) {
        float o[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = (g[j][e] - m1 - v[j][e] * m2) * rstd;
        dr[j * 32 + lane] = pack8(o);
    }
}

#define LN_WARP(NC)                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) ln_fwd_warp_bf16_##NC(const bf16_t* x, const float* w,   \
            const float* b, bf16_t* y, int rows, float eps) { ln_fwd_warp<NC>(x, w, b, y, rows, eps); }        \
    extern "C" __global__ void __launch_bounds__(256) ln_bwd_warp_bf16_##NC(const bf16_t* x, const bf16_t* dy, \
            const float* w, bf16_t* dx, int rows, float eps) { ln_bwd_warp<NC>(x, dy, w, dx, rows, eps); }
LN_WARP(1)
LN_WARP(2)
LN_WARP(4)

extern "C" __global__ void ln_fwd_bf16(const bf16_t* x, const float* w, const float* b, bf16_t* y, int c, float eps) { ln_fwd(x, w, b, y, c, eps); }
extern "C" __global__ void ln_fwd_f32(const float* x, const float* w, const float* b, float* y, int c, float eps) { ln_fwd(x, w, b, y, c, eps); }
extern "C" __global__ void ln_bwd_bf16(const bf16_t* x, const bf16_t* dy, const float* w, bf16_t* dx, int c, float eps) { ln_bwd(x, dy, w, dx, c, eps); }
extern "C" __global__ void ln_bwd_f32(const float* x, const float* dy, const float* w, float* dx, int c, float eps) { ln_bwd(x, dy, w, dx, c, eps); }

// GroupNorm of (B, C, spatial...) rows: row r = (b, g) is the contiguous span of the group's
// cpg channels (len = cpg * hw elements); chunk k of a row is [k * chunk, min(len, (k + 1) * chunk)).
// Statistics: each chunk's mean and centred sum of squares (gn_part), combined per row with
// Chan's formula where they are used, so no kernel holds a whole row and nothing is atomic.

// The channel (within the group) of increasing row offsets i: one division when created, then
// steps (a thread's offsets grow by blockDim.x, so a channel of hw >= blockDim.x elements is
// crossed at most once per step).
struct ChannelCursor {
    int c, next, hw;
    __device__ ChannelCursor(int i, int hw_) : c(i / hw_), next((i / hw_ + 1) * hw_), hw(hw_) {}
    __device__ int at(int i) {
        while (i >= next) { ++c; next += hw; }
        return c;
    }
};

// Mean and centred sum of squares of chunk blockIdx.x of row blockIdx.y.
template <typename T>
__device__ void gn_part(const T* x, float* part, long long len, int chunk) {
    __shared__ float sh[32];
    const long long row = blockIdx.y;
    const int k = blockIdx.x, nk = gridDim.x;
    const long long s0 = (long long)k * chunk;
    const int n = (int)min((long long)chunk, len - s0);
    const T* xc = x + row * len + s0;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += ld(xc, i);
    const float m = block_sum(s, sh) / n;
    float q = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { const float d = ld(xc, i) - m; q += d * d; }
    q = block_sum(q, sh);
    if (threadIdx.x == 0) {
        part[(row * nk + k) * 2] = m;
        part[(row * nk + k) * 2 + 1] = q;
    }
}

// The row's mean and 1/sqrt(var + eps) from its nk chunk statistics.
__device__ void gn_stats(const float* part, int nk, long long len, int chunk, float eps, float* sh,
                         float* mean, float* rstd) {
    float s = 0.f;
    for (int k = threadIdx.x; k < nk; k += blockDim.x) {
        const float n = (float)min((long long)chunk, len - (long long)k * chunk);
        s += n * part[2 * k];
    }
    const float m = block_sum(s, sh) / (float)len;
    float q = 0.f;
    for (int k = threadIdx.x; k < nk; k += blockDim.x) {
        const float n = (float)min((long long)chunk, len - (long long)k * chunk);
        const float d = part[2 * k] - m;
        q += part[2 * k + 1] + n * d * d;
    }
    const float var = block_sum(q, sh) / (float)len;
    *mean = m;
    *rstd = 1.f / sqrtf(var + eps);
}

// A block's chunk of its row (blockIdx.y, chunk blockIdx.x of gridDim.x): the row's statistics,
// the chunk's start and length, the group's first channel.
struct GnChunk {
    long long row;
    int k, nk, s0, n, c0;
    float mean, rstd;
};

__device__ GnChunk gn_chunk(const float* part, long long len, int chunk, int cpg, int groups, float eps, float* sh) {
    GnChunk c;
    c.row = blockIdx.y;
    c.k = blockIdx.x;
    c.nk = gridDim.x;
    gn_stats(part + c.row * c.nk * 2, c.nk, len, chunk, eps, sh, &c.mean, &c.rstd);
    c.s0 = c.k * chunk;
    c.n = (int)min((long long)chunk, len - c.s0);
    c.c0 = (int)(c.row % groups) * cpg;
    return c;
}

template <typename T>
__device__ void gn_fwd(const T* x, const float* part, const float* w, const float* b, T* y, long long len,
                       int chunk, int hw, int cpg, int groups, float eps) {
    __shared__ float sh[32];
    const GnChunk ch = gn_chunk(part, len, chunk, cpg, groups, eps, sh);
    const long long row = ch.row;
    const int s0 = ch.s0, n = ch.n, c0 = ch.c0;
    const float mean = ch.mean, rstd = ch.rstd;
    const T* xr = x + row * len;
    T* yr = y + row * len;
    ChannelCursor cur(s0 + (int)threadIdx.x, hw);
    for (int i = s0 + threadIdx.x; i < s0 + n; i += blockDim.x) {
        const int c = c0 + cur.at(i);
        st(yr, i, (ld(xr, i) - mean) * rstd * w[c] + b[c]);
    }
}

// Chunk sums of g = dy * w[c] and g * xhat (part2), for the input gradient.
template <typename T>
__device__ void gn_bwd_part(const T* x, const T* dy, const float* part, const float* w, float* part2,
                            long long len, int chunk, int hw, int cpg, int groups, float eps) {
    __shared__ float sh[32];
    const GnChunk ch = gn_chunk(part, len, chunk, cpg, groups, eps, sh);
    const long long row = ch.row;
    const int k = ch.k, nk = ch.nk, s0 = ch.s0, n = ch.n, c0 = ch.c0;
    const float mean = ch.mean, rstd = ch.rstd;
    const T* xr = x + row * len;
    const T* gr = dy + row * len;
    float s1 = 0.f, s2 = 0.f;
    ChannelCursor cur(s0 + (int)threadIdx.x, hw);
    for (int i = s0 + threadIdx.x; i < s0 + n; i += blockDim.x) {
        const float g = ld(gr, i) * w[c0 + cur.at(i)];
        s1 += g;
        s2 += g * (ld(xr, i) - mean) * rstd;
    }
    s1 = block_sum(s1, sh);
    s2 = block_sum(s2, sh);
    if (threadIdx.x == 0) {
        part2[(row * nk + k) * 2] = s1;
        part2[(row * nk + k) * 2 + 1] = s2;
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the row.
template <typename T>
__device__ void gn_bwd(const T* x, const T* dy, const float* part, const float* part2, const float* w, T* dx,
                       long long len, int chunk, int hw, int cpg, int groups, float eps) {
    __shared__ float sh[32];
    const GnChunk ch = gn_chunk(part, len, chunk, cpg, groups, eps, sh);
    const long long row = ch.row;
    const int nk = ch.nk, s0 = ch.s0, n = ch.n, c0 = ch.c0;
    const float mean = ch.mean, rstd = ch.rstd;
    const float* p2 = part2 + row * nk * 2;
    float s1 = 0.f, s2 = 0.f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) { s1 += p2[2 * j]; s2 += p2[2 * j + 1]; }
    const float m1 = block_sum(s1, sh) / (float)len;
    const float m2 = block_sum(s2, sh) / (float)len;
    const T* xr = x + row * len;
    const T* gr = dy + row * len;
    T* dr = dx + row * len;
    ChannelCursor cur(s0 + (int)threadIdx.x, hw);
    for (int i = s0 + threadIdx.x; i < s0 + n; i += blockDim.x) {
        const float g = ld(gr, i) * w[c0 + cur.at(i)];
        const float xh = (ld(xr, i) - mean) * rstd;
        st(dr, i, (g - m1 - xh * m2) * rstd);
    }
}

#define GN_KERNELS(S, T)                                                                                    \
extern "C" __global__ void gn_part_##S(const T* x, float* part, long long len, int chunk) {                \
    gn_part(x, part, len, chunk);                                                                           \
}                                                                                                           \
extern "C" __global__ void gn_fwd_##S(const T* x, const float* part, const float* w, const float* b, T* y,  \
                                      long long len, int chunk, int hw, int cpg, int groups, float eps) {   \
    gn_fwd(x, part, w, b, y, len, chunk, hw, cpg, groups, eps);                                             \
}                                                                                                           \
extern "C" __global__ void gn_bwd_part_##S(const T* x, const T* dy, const float* part, const float* w,      \
                                           float* part2, long long len, int chunk, int hw, int cpg,         \
                                           int groups, float eps) {                                         \
    gn_bwd_part(x, dy, part, w, part2, len, chunk, hw, cpg, groups, eps);                                   \
}                                                                                                           \
extern "C" __global__ void gn_bwd_##S(const T* x, const T* dy, const float* part, const float* part2,       \
                                      const float* w, T* dx, long long len, int chunk, int hw, int cpg,     \
                                      int groups, float eps) {                                              \
    gn_bwd(x, dy, part, part2, w, dx, len, chunk, hw, cpg, groups, eps);                                    \
}
GN_KERNELS(bf16, bf16_t)
GN_KERNELS(f32, float)
