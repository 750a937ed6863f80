// Runs launch plans of lorahost's CUDA kernels (flash attention, 3x3 convolution, LayerNorm and
// GroupNorm, gradient statistics, row copies, the linear epilogue, RoPE, the dropout mask and
// the adapted linears' activation/dropout and input-gradient kernels, the LoRA low-rank
// kernels) on the CPU emulation (emu.h).
// Usage: driver PLAN. The plan, one directive per line:
//   buffer BYTES PATH|-     a buffer (ids count from 0), filled from PATH or zeroed
//   launch NAME GX GY GZ THREADS N ARG...   arguments as the host passes them (u64 words);
//                                           a pointer is ((id + 1) << 48) | byte offset
//   output ID PATH          write buffer ID to PATH after all launches
//   pointers ID STRIDE      buffer ID is a table of u64 words: every STRIDE-th word (from the
//                           first) is a pointer argument, turned into the emulation's address
#include "emu.h"
#include "kernels.inc"
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

static std::vector<std::vector<unsigned char>> buffers;

static void* ptr(uint64_t a) {
    if (a == 0) return nullptr;
    const uint64_t id = (a >> 48) - 1, off = a & ((1ull << 48) - 1);
    if (id >= buffers.size() || off > buffers[id].size()) {
        std::fprintf(stderr, "bad pointer argument %llu\n", (unsigned long long)a);
        std::exit(3);
    }
    return buffers[id].data() + off;
}

using Args = std::vector<uint64_t>;
#define P(i) ptr(a.at(i))
#define BF(i) ((bf16_t*)P(i))
#define F(i) ((float*)P(i))
#define L(i) ((long long)a.at(i))
#define I(i) ((int)(uint32_t)a.at(i))
#define R(i) (__uint_as_float((uint32_t)a.at(i)))
#define V(i) BF(i), L(i + 1), L(i + 2), L(i + 3)
#define U(i) ((unsigned long long)a.at(i))
#define U8(i) ((unsigned char*)P(i))

#define KERNELS_AS(NAME)                                                                                \
    {"fa_forward_" #NAME, [](const Args& a) { fa_forward_##NAME(V(0), V(4), V(8), V(12), F(16), I(17), I(18), I(19), R(20)); }}, \
    {"fa_backward_kv_" #NAME, [](const Args& a) {                                                     \
         fa_backward_kv_##NAME(V(0), V(4), V(8), V(12), F(16), F(17), V(18), V(22), I(26), I(27), I(28), \
             R(29), R(30));                                                                             \
     }},                                                                                                \
    {"fa_backward_q_" #NAME, [](const Args& a) {                                                      \
         fa_backward_q_##NAME(V(0), V(4), V(8), V(12), F(16), F(17), V(18), I(22), I(23), I(24), R(25), \
             R(26));                                                                                    \
     }},
// The pipelined build (fa_forward_64, ...) and the one-stage build (fa_forward_64_s1, ...).
#define KERNELS(HD) KERNELS_AS(HD) KERNELS_AS(HD##_s1)

#define DT(T, i) ((T*)P(i))
#define NORMS(S, T)                                                                                     \
    {"ln_fwd_" #S, [](const Args& a) { ln_fwd_##S(DT(T, 0), F(1), F(2), DT(T, 3), I(4), R(5)); }},              \
    {"ln_bwd_" #S, [](const Args& a) { ln_bwd_##S(DT(T, 0), DT(T, 1), F(2), DT(T, 3), I(4), R(5)); }},              \
    {"gn_part_" #S, [](const Args& a) { gn_part_##S(DT(T, 0), F(1), L(2), I(3)); }},                        \
    {"gn_fwd_" #S, [](const Args& a) {                                                                  \
         gn_fwd_##S(DT(T, 0), F(1), F(2), F(3), DT(T, 4), L(5), I(6), I(7), I(8), I(9), R(10));                  \
     }},                                                                                                \
    {"gn_bwd_part_" #S, [](const Args& a) {                                                             \
         gn_bwd_part_##S(DT(T, 0), DT(T, 1), F(2), F(3), F(4), L(5), I(6), I(7), I(8), I(9), R(10));             \
     }},                                                                                                \
    {"gn_bwd_" #S, [](const Args& a) {                                                                  \
         gn_bwd_##S(DT(T, 0), DT(T, 1), F(2), F(3), F(4), DT(T, 5), L(6), I(7), I(8), I(9), I(10), R(11));           \
     }},
#define LN_WARP(NC)                                                                                     \
    {"ln_fwd_warp_bf16_" #NC, [](const Args& a) { ln_fwd_warp_bf16_##NC(BF(0), F(1), F(2), BF(3), I(4), R(5)); }}, \
    {"ln_bwd_warp_bf16_" #NC, [](const Args& a) { ln_bwd_warp_bf16_##NC(BF(0), BF(1), F(2), BF(3), I(4), R(5)); }},
#define NORM_ARITY(S)                                                                                   \
    {"ln_fwd_" #S, 6}, {"ln_bwd_" #S, 6}, {"gn_part_" #S, 4}, {"gn_fwd_" #S, 11}, {"gn_bwd_part_" #S, 11}, \
        {"gn_bwd_" #S, 12},

#define ROWS(N, U)                                                                                      \
    {"rows_copy_" #N, [](const Args& a) {                                                               \
         rows_copy_##N((const U*)P(0), (U*)P(1), L(2), I(3), L(4), L(5), L(6), L(7), L(8), L(9), L(10),     \
             L(11), L(12), L(13));                                                                      \
     }},

static const std::map<std::string, void (*)(const Args&)> kernels = {
    {"epilogue_bf16", [](const Args& a) { epilogue_bf16(BF(0), BF(1), BF(2), BF(3), L(4), I(5)); }},
    {"factors_bf16", [](const Args& a) { factors_bf16(F(0), L(1), F(2), L(3), R(4), BF(5)); }},
    {"keep_mask", [](const Args& a) { keep_mask(U8(0), U(1), (unsigned)a.at(2), L(3)); }},
    {"act_drop_bf16", [](const Args& a) {
        act_drop_bf16(BF(0), U8(1), U(2), (unsigned)a.at(3), R(4), I(5), BF(6), BF(7), L(8)); }},
    {"input_grad_bf16", [](const Args& a) {
        input_grad_bf16(BF(0), BF(1), U8(2), U(3), (unsigned)a.at(4), R(5), BF(6), I(7), BF(8), L(9)); }},
    {"lr_down_2", [](const Args& a) { lr_down_2(BF(0), BF(1), BF(2), L(3), I(4), I(5), U8(6), U(7), (unsigned)a.at(8), R(9), I(10)); }},
    {"lr_down_4", [](const Args& a) { lr_down_4(BF(0), BF(1), BF(2), L(3), I(4), I(5), U8(6), U(7), (unsigned)a.at(8), R(9), I(10)); }},
    {"lr_down_8", [](const Args& a) { lr_down_8(BF(0), BF(1), BF(2), L(3), I(4), I(5), U8(6), U(7), (unsigned)a.at(8), R(9), I(10)); }},
    {"lr_grad_a_1", [](const Args& a) {
        lr_grad_a_1(BF(0), BF(1), F(2), L(3), I(4), I(5), L(6), U8(7), U(8), (unsigned)a.at(9), R(10), I(11)); }},
    {"lr_grad_a_2", [](const Args& a) {
        lr_grad_a_2(BF(0), BF(1), F(2), L(3), I(4), I(5), L(6), U8(7), U(8), (unsigned)a.at(9), R(10), I(11)); }},
    {"lr_grad_a_4", [](const Args& a) {
        lr_grad_a_4(BF(0), BF(1), F(2), L(3), I(4), I(5), L(6), U8(7), U(8), (unsigned)a.at(9), R(10), I(11)); }},
    {"lr_sum", [](const Args& a) { lr_sum(F(0), F(1), L(2), I(3)); }},
#define LR_INPUT_GRAD(KT)                                                                                     \
    {"lr_input_grad_" #KT, [](const Args& a) {                                                              \
         lr_input_grad_##KT(BF(0), BF(1), BF(2), BF(3), BF(4), L(5), I(6), I(7), U8(8), U(9), (unsigned)a.at(10), \
             R(11), I(12));                                                                                 \
     }},
    LR_INPUT_GRAD(1) LR_INPUT_GRAD(2) LR_INPUT_GRAD(4)
    {"rope_bf16", [](const Args& a) { rope_bf16(BF(0), F(1), F(2), BF(3), I(4), I(5), I(6), I(7), I(8)); }},
    ROWS(16, unit16_t) ROWS(4, unsigned int) ROWS(2, unsigned short)
    {"grad_stats", [](const Args& a) { grad_stats((const long long*)P(0), I(1), F(2)); }},
    {"fa_delta", [](const Args& a) { fa_delta(V(0), V(4), F(8), I(9), I(10), I(11), L(12)); }},
    {"conv3x3_bf16", [](const Args& a) { conv3x3_bf16(BF(0), BF(1), BF(2), BF(3), I(4), I(5), I(6), I(7), I(8)); }},
    {"conv_pack_bf16", [](const Args& a) { conv_pack_bf16(BF(0), BF(1), I(2), I(3), I(4), I(5)); }},
    {"conv_unpack_bf16", [](const Args& a) { conv_unpack_bf16(BF(0), BF(1), BF(2), I(3), I(4), I(5)); }},
    LN_WARP(1) LN_WARP(2) LN_WARP(4)
    KERNELS(32) KERNELS(64) NORMS(bf16, bf16_t) NORMS(f32, float)};
static const std::map<std::string, size_t> arity = {
    {"fa_forward_32", 21}, {"fa_forward_64", 21}, {"fa_backward_kv_32", 31}, {"fa_backward_kv_64", 31},
    {"fa_backward_q_32", 27}, {"fa_backward_q_64", 27}, {"fa_forward_32_s1", 21}, {"fa_forward_64_s1", 21},
    {"fa_backward_kv_32_s1", 31}, {"fa_backward_kv_64_s1", 31}, {"fa_backward_q_32_s1", 27},
    {"fa_backward_q_64_s1", 27}, {"fa_delta", 13}, {"conv3x3_bf16", 9}, {"conv_pack_bf16", 6}, {"conv_unpack_bf16", 6}, {"grad_stats", 3},
    {"epilogue_bf16", 6}, {"rope_bf16", 9}, {"keep_mask", 4}, {"factors_bf16", 6}, {"lr_down_2", 11}, {"lr_down_4", 11}, {"lr_down_8", 11}, {"lr_grad_a_1", 12}, {"lr_grad_a_2", 12}, {"lr_grad_a_4", 12}, {"lr_sum", 4}, {"lr_input_grad_1", 13}, {"lr_input_grad_2", 13}, {"lr_input_grad_4", 13}, {"act_drop_bf16", 9}, {"input_grad_bf16", 10}, {"rows_copy_16", 14}, {"rows_copy_4", 14}, {"rows_copy_2", 14},
    NORM_ARITY(bf16) NORM_ARITY(f32) {"ln_fwd_warp_bf16_1", 6}, {"ln_fwd_warp_bf16_2", 6},
    {"ln_fwd_warp_bf16_4", 6}, {"ln_bwd_warp_bf16_1", 6}, {"ln_bwd_warp_bf16_2", 6}, {"ln_bwd_warp_bf16_4", 6}};

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    std::ifstream plan(argv[1]);
    std::string line;
    std::vector<std::pair<size_t, std::string>> outputs;
    while (std::getline(plan, line)) {
        std::istringstream in(line);
        std::string what;
        in >> what;
        if (what == "buffer") {
            size_t bytes;
            std::string path;
            in >> bytes >> path;
            buffers.emplace_back(bytes, 0);
            if (path != "-") {
                std::ifstream f(path, std::ios::binary);
                f.read((char*)buffers.back().data(), (std::streamsize)bytes);
                if (!f) { std::fprintf(stderr, "short read %s\n", path.c_str()); return 3; }
            }
        } else if (what == "launch") {
            std::string name;
            dim3 grid;
            unsigned threads;
            size_t n;
            in >> name >> grid.x >> grid.y >> grid.z >> threads >> n;
            Args a(n);
            for (auto& x : a) in >> x;
            auto ar = arity.find(name);
            if (ar == arity.end() || ar->second != n) {
                std::fprintf(stderr, "%s: %zu arguments, the kernel takes %zu\n", name.c_str(), n,
                    ar == arity.end() ? 0 : ar->second);
                return 4;
            }
            void (*k)(const Args&) = kernels.at(name);
            emu_launch(grid, threads, [&] { k(a); });
        } else if (what == "pointers") {
            size_t id, stride;
            in >> id >> stride;
            auto& b = buffers.at(id);
            for (size_t w = 0; w + 8 <= b.size(); w += 8 * stride) {
                uint64_t handle;
                std::memcpy(&handle, b.data() + w, 8);
                const uint64_t real = (uint64_t)(uintptr_t)ptr(handle);
                std::memcpy(b.data() + w, &real, 8);
            }
        } else if (what == "output") {
            size_t id;
            std::string path;
            in >> id >> path;
            outputs.emplace_back(id, path);
        }
    }
    for (auto& [id, path] : outputs) {
        std::ofstream f(path, std::ios::binary);
        f.write((const char*)buffers.at(id).data(), (std::streamsize)buffers.at(id).size());
    }
    return 0;
}
