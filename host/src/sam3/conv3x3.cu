// lorahost 3x3 convolution (stride 1, padding 1) on bf16 NCHW tensors as an implicit GEMM on the
// tensor cores: y[b, co, p] = bias[co] + Σ_k w[co, k] · x[b, ci, p + (ky − 1, kx − 1)] with
// k = ci · 9 + ky · 3 + kx (the weight's own (Cout, Cin, 3, 3) order) and zero padding. No im2col
// matrix is written: each block gathers its 64 pixels × 32 k slice of it into shared memory.
// The input gradient of a convolution is the same convolution of the output gradient with the
// weight transposed and flipped (the host passes that weight), so one kernel serves both.
// Compiled after cuda_kernels::PRELUDE and cuda_kernels::TENSOR_CORE; also as plain C++ by the
// CPU emulation test (host/tests/cuda_emu.rs).
//
// One block of 128 threads owns 64 output pixels (of the B · H · W, row-major) × 64 output
// channels; each warp 16 pixels × 64 channels. Grid (ceil(B·H·W / 64), ceil(Cout / 64)).

#define CV_M 64
#define CV_N 64
#define CV_K 32
#define CV_PAD 8
#define CV_THREADS 128

extern "C" __global__ void __launch_bounds__(CV_THREADS) conv3x3_bf16(const bf16_t* __restrict__ x,
        const bf16_t* __restrict__ w, const bf16_t* __restrict__ bias, bf16_t* __restrict__ y, int batch, int cin,
        int cout, int height, int width) {
    // The im2col slice stored [k][pixel] (so its gathers are contiguous in pixels), the weight
    // slice [channel][k].
    __shared__ __align__(16) bf16_t as[CV_K][CV_M + CV_PAD];
    __shared__ __align__(16) bf16_t bs[CV_N][CV_K + CV_PAD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const long long plane = (long long)height * width;
    const long long pixels = (long long)batch * plane;
    const long long m0 = (long long)blockIdx.x * CV_M;
    const int n0 = blockIdx.y * CV_N;
    const int kt = cin * 9;
    // This thread gathers pixel m0 + (tid % 64) for every other k of a slice.
    const int my_m = threadIdx.x & (CV_M - 1), my_k = threadIdx.x / CV_M;
    const long long m = m0 + my_m;
    const bool m_in = m < pixels;
    int ph = 0, pw = 0;
    const bf16_t* xb = x;
    if (m_in) {
        const long long pb = m / plane, p = m % plane;
        ph = (int)(p / width);
        pw = (int)(p % width);
        xb = x + pb * cin * plane;
    }
    float acc[CV_N / 8][4];
    tc_zero<CV_N / 8>(acc);
    for (int k0 = 0; k0 < kt; k0 += CV_K) {
        __syncthreads();
        for (int kl = my_k; kl < CV_K; kl += CV_THREADS / CV_M) {
            const int k = k0 + kl;
            bf16_t v = 0;
            if (m_in && k < kt) {
                const int ci = k / 9, r = k - ci * 9;
                const int hh = ph + r / 3 - 1, ww = pw + r % 3 - 1;
                if (hh >= 0 && hh < height && ww >= 0 && ww < width) v = xb[ci * plane + (long long)hh * width + ww];
            }
            as[kl][my_m] = v;
        }
        for (int i = threadIdx.x; i < CV_N * CV_K; i += CV_THREADS) {
            const int n = i / CV_K, kl = i % CV_K, k = k0 + kl;
            bs[n][kl] = (n0 + n < cout && k < kt) ? w[(long long)(n0 + n) * kt + k] : (bf16_t)0;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CV_K / 16; ++kk) {
            unsigned a[4];
            tc_a_km(a, as, warp * 16, kk, lane);
#pragma unroll
            for (int j = 0; j < CV_N / 8; j += 2) {
                unsigned bb[4];
                tc_b_nk(bb, bs, j * 8, kk, lane);
                mma16816(acc[j], a, bb);
                mma16816(acc[j + 1], a, bb + 2);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < CV_N / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int co = n0 + j * 8 + t * 2 + (e & 1);
            const long long mm = m0 + warp * 16 + g + (e >= 2 ? 8 : 0);
            if (co < cout && mm < pixels) {
                const long long b = mm / plane, p = mm % plane;
                st(y, (b * cout + co) * plane + p, acc[j][e] + (bias ? ld(bias, co) : 0.f));
            }
        }
    }
}

// The same convolution as nine shifted products on cuBLAS (the host's route where the GPU has
// it, super::conv_cuda): conv_pack_bf16 writes the input channels-last with a zero border,
// xp[b][r][c] for r < rows = (H + 2)·(W + 2) + 2 (the last two rows and the border zero), so
// the output grid's pixel (y, x) — computed at the padded width W + 2, two columns of it
// discarded — reads tap (ky, kx) at row y·(W + 2) + x + ky·(W + 2) + kx: each tap is one
// product of a plain row-major matrix starting at that offset. conv_unpack_bf16 writes those
// products' sum yp[b][y·(W + 2) + x][c] back as NCHW without the two columns, adding the bias.
// Both transpose through a 32 × 32 tile so reads and writes are contiguous; grid
// (ceil(rows or H·W / 32), ceil(C / 32), B), 256 threads.

#define CP_T 32

extern "C" __global__ void __launch_bounds__(256) conv_pack_bf16(const bf16_t* __restrict__ x,
        bf16_t* __restrict__ xp, int channels, int height, int width, int rows) {
    __shared__ bf16_t tile[CP_T][CP_T + 1];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int r0 = blockIdx.x * CP_T, c0 = blockIdx.y * CP_T;
    const long long b = blockIdx.z;
    const int wp = width + 2;
    // Padded row r0 + tx (consecutive threads read consecutive pixels of a channel).
    const int r = r0 + tx;
    const int py = r / wp, px = r - py * wp;
    const int y = py - 1, xx = px - 1;
    const bool inside = r < rows && y >= 0 && y < height && xx >= 0 && xx < width;
    for (int c = ty; c < CP_T; c += 8) {
        const int ch = c0 + c;
        tile[c][tx] = (inside && ch < channels) ? x[((b * channels + ch) * height + y) * width + xx] : (bf16_t)0;
    }
    __syncthreads();
    for (int rr = ty; rr < CP_T; rr += 8) {
        const int row = r0 + rr, ch = c0 + tx;
        if (row < rows && ch < channels) xp[(b * rows + row) * channels + ch] = tile[tx][rr];
    }
}

extern "C" __global__ void __launch_bounds__(256) conv_unpack_bf16(const bf16_t* __restrict__ yp,
        const bf16_t* __restrict__ bias, bf16_t* __restrict__ y, int channels, int height, int width) {
    __shared__ float tile[CP_T][CP_T + 1];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int p0 = blockIdx.x * CP_T, c0 = blockIdx.y * CP_T;
    const long long b = blockIdx.z;
    const int plane = height * width, wp = width + 2;
    const long long grid_rows = (long long)height * wp;
    // Pixel p0 + pp's row of the output grid (consecutive threads read consecutive channels).
    for (int pp = ty; pp < CP_T; pp += 8) {
        const int p = p0 + pp, ch = c0 + tx;
        float v = 0.f;
        if (p < plane && ch < channels) {
            const int yy = p / width, xx = p - yy * width;
            v = ld(yp, (b * grid_rows + (long long)yy * wp + xx) * channels + ch) + (bias ? ld(bias, ch) : 0.f);
        }
        tile[pp][tx] = v;
    }
    __syncthreads();
    for (int cc = ty; cc < CP_T; cc += 8) {
        const int ch = c0 + cc, p = p0 + tx;
        if (p < plane && ch < channels) st(y, (b * channels + ch) * (long long)plane + p, tile[tx][cc]);
    }
}
