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
