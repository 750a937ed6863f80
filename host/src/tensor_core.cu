// Tensor-core building blocks shared by lorahost's CUDA kernels (flash attention, 3x3
// convolution, LoRA): mma.sync m16n8k16 on bf16 with f32 accumulation, ldmatrix, cp.async,
// bf16 packing, and B-operand fragment loads from shared-memory tiles. Compiled after cuda_kernels::PRELUDE. The
// CPU emulation (host/tests/cuda_emu/emu.h, LORAHOST_EMU) defines the instructions itself.

#ifndef LORAHOST_EMU
// d (16x8 f32) += a (16x16 bf16, row) · b (16x8 bf16, col); fragment layouts as in the PTX ISA.
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned tc_smem(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }\n" : "=r"(a) : "l"(p));
    return a;
}
// Four 8x8 bf16 matrices from shared memory (lane l gives row l % 8 of matrix l / 8): r[i] holds
// row lane / 4, columns 2 (lane % 4) and + 1 of matrix i.
__device__ __forceinline__ void ldsm_x4(unsigned* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(tc_smem(p)));
}
// The same transposed: r[i] holds rows 2 (lane % 4) and + 1, column lane / 4 of matrix i.
__device__ __forceinline__ void ldsm_x4_t(unsigned* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(tc_smem(p)));
}
// 16 bytes from global to shared memory without passing through registers (cp.async, L2 only);
// `valid` false writes 16 zero bytes instead (src is then not read, but must be a valid
// address). Completes at a later tc_cp_wait: the copies issued since the last tc_cp_commit
// form one group.
__device__ __forceinline__ void tc_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(tc_smem(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void tc_cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void tc_cp_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
// Two floats rounded to nearest even bf16, packed (lo in the low half).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

struct __align__(16) tc_u32x4 { unsigned x, y, z, w; };

__device__ __forceinline__ unsigned tc_ld32(const bf16_t* p) { return *(const unsigned*)p; }

template <int N>
__device__ __forceinline__ void tc_zero(float (*c)[4]) {
#pragma unroll
    for (int j = 0; j < N; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
}

// B-operand fragments of the two n-tiles n0 and n0 + 8 at k-chunk kk (k = kk * 16 ..) from a
// shared tile stored [n][k]: b[0], b[1] for n0, b[2], b[3] for n0 + 8.
template <int W>
__device__ __forceinline__ void tc_b_nk(unsigned* b, bf16_t (*s)[W], int n0, int kk, int lane) {
    const int m = lane >> 3, r = lane & 7;
    ldsm_x4(b, &s[n0 + (m >> 1) * 8 + r][kk * 16 + (m & 1) * 8]);
}

// The same from a shared tile stored [k][n] (transposed on the way by ldmatrix).
template <int W>
__device__ __forceinline__ void tc_b_kn(unsigned* b, bf16_t (*s)[W], int n0, int kk, int lane) {
    const int m = lane >> 3, r = lane & 7;
    ldsm_x4_t(b, &s[kk * 16 + (m & 1) * 8 + r][n0 + (m >> 1) * 8]);
}

// A-operand fragment of rows row0 .. row0 + 16 at k-chunk kk from a shared tile stored [k][m]
// (transposed on the way by ldmatrix).
template <int W>
__device__ __forceinline__ void tc_a_km(unsigned* a, bf16_t (*s)[W], int row0, int kk, int lane) {
    const int m = lane >> 3, r = lane & 7;
    ldsm_x4_t(a, &s[kk * 16 + (m >> 1) * 8 + r][row0 + (m & 1) * 8]);
}
