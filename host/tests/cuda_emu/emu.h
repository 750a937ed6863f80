// A CPU emulation of the CUDA features lorahost's flash attention kernels use, so that the very
// kernel source runs (slowly) as plain C++ on a machine without a GPU: one std::thread per CUDA
// thread, blocks one after another (so `__shared__` = function-static storage is block-shared),
// __syncthreads as a block barrier, warp shuffles and mma.sync m16n8k16 (bf16 in, f32
// accumulate; fragment layouts per the PTX ISA) and ldmatrix as exchanges through per-warp
// buffers.
#pragma once
#define LORAHOST_EMU 1
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
using std::max;
using std::min;

// CUDA's 16-byte vector type (the LayerNorm row kernels load and store 8 bf16 at a time).
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float x) { return expf(x); }

struct EmuBlock {
    std::barrier<> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    // Per warp and lane: shuffle word, mma operands and accumulators.
    std::vector<unsigned> word;
    std::vector<unsigned> a, b;
    std::vector<float> c;
    std::vector<const unsigned short*> rows;
    explicit EmuBlock(unsigned threads)
        : block(threads), word(threads), a(threads * 4), b(threads * 2), c(threads * 4), rows(threads) {
        for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(new std::barrier<>(32));
    }
};
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block.arrive_and_wait(); }
inline void emu_warp_sync() { emu_block->warps[threadIdx.x / 32]->arrive_and_wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    const unsigned me = threadIdx.x, base = me & ~31u, lane = me & 31u;
    unsigned bits;
    std::memcpy(&bits, &v, 4);
    emu_block->word[me] = bits;
    emu_warp_sync();
    bits = emu_block->word[base + (lane ^ (unsigned)mask)];
    emu_warp_sync();
    T out;
    std::memcpy(&out, &bits, 4);
    return out;
}

inline float emu_bf16(unsigned bits16) { return __uint_as_float((bits16 & 0xffffu) << 16); }

// Round to nearest even (NaN to the canonical quiet NaN), as cvt.rn.bf16x2.f32.
inline unsigned emu_round_bf16(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
inline unsigned pack_bf16(float lo, float hi) { return emu_round_bf16(lo) | (emu_round_bf16(hi) << 16); }

// Element (row, col) of the warp's A (16x16, row) and B (16x8, col) operands.
inline float emu_a(unsigned base, int row, int col) {
    const int lane = (row % 8) * 4 + (col % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    const unsigned w = emu_block->a[(base + lane) * 4 + reg];
    return emu_bf16((col & 1) ? (w >> 16) : w);
}
inline float emu_b(unsigned base, int row, int col) {
    const int lane = col * 4 + (row % 8) / 2;
    const int reg = row >= 8 ? 1 : 0;
    const unsigned w = emu_block->b[(base + lane) * 2 + reg];
    return emu_bf16((row & 1) ? (w >> 16) : w);
}

inline void mma16816(float* c, const unsigned* a, const unsigned* b) {
    const unsigned me = threadIdx.x, base = me & ~31u, lane = me & 31u;
    for (int i = 0; i < 4; ++i) emu_block->a[me * 4 + i] = a[i];
    for (int i = 0; i < 2; ++i) emu_block->b[me * 2 + i] = b[i];
    emu_warp_sync();
    const int g = (int)lane >> 2, t = (int)lane & 3;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = t * 2 + (e & 1);
        double s = c[e];
        for (int kk = 0; kk < 16; ++kk) s += (double)emu_a(base, row, kk) * (double)emu_b(base, kk, col);
        out[e] = (float)s;
    }
    emu_warp_sync();
    for (int e = 0; e < 4; ++e) c[e] = out[e];
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l supplies the address of row l % 8 of
// matrix l / 8; r[i] receives matrix i's row lane / 4, columns 2 (lane % 4) and + 1, or with
// `trans` rows 2 (lane % 4) and + 1 of column lane / 4.
inline void emu_ldsm(unsigned* r, const unsigned short* p, bool trans) {
    const unsigned me = threadIdx.x, base = me & ~31u, lane = me & 31u;
    emu_block->rows[me] = p;
    emu_warp_sync();
    for (unsigned m = 0; m < 4; ++m) {
        unsigned lo, hi;
        if (!trans) {
            const unsigned short* row = emu_block->rows[base + m * 8 + lane / 4];
            lo = row[(lane % 4) * 2];
            hi = row[(lane % 4) * 2 + 1];
        } else {
            lo = emu_block->rows[base + m * 8 + (lane % 4) * 2][lane / 4];
            hi = emu_block->rows[base + m * 8 + (lane % 4) * 2 + 1][lane / 4];
        }
        r[m] = lo | (hi << 16);
    }
    emu_warp_sync();
}
inline void ldsm_x4(unsigned* r, const unsigned short* p) { emu_ldsm(r, p, false); }
inline void ldsm_x4_t(unsigned* r, const unsigned short* p) { emu_ldsm(r, p, true); }

// cp.async as an immediate copy (the kernels' barriers order it as on the GPU, where it lands
// later: a copy into a buffer other warps still read shows up here as a wrong result).
inline void tc_cp16(void* dst, const void* src, bool valid) {
    if (valid) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
}
inline void tc_cp_commit() {}
template <int N>
inline void tc_cp_wait() {}

// Run `kernel` over `grid` blocks of `threads` threads, one block at a time.
inline void emu_launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                EmuBlock blk(threads);
                std::vector<std::thread> ts;
                for (unsigned i = 0; i < threads; ++i)
                    ts.emplace_back([&, i] {
                        threadIdx = dim3{i, 0, 0};
                        blockIdx = dim3{x, y, z};
                        emu_block = &blk;
                        kernel();
                    });
                for (auto& th : ts) th.join();
            }
}
