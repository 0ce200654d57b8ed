"""Named block sizes and launch constants of the Triton kernels, each with its reason.

Shapes are written ``[rows, cols]``. ``BN`` is a token block (rows of hidden), ``BV`` a vocab
block (rows of the LM-head weight), ``BD`` a chunk of the hidden dimension (the ``tl.dot``
reduction axis). The numbers are starting points chosen from the tile arithmetic below and
checked with ``alignops kernels`` (registers, shared memory, spills for sm_80 and sm_90a), not
autotuned on a GPU; the launchers read them only through their ``*_config`` heuristics.
"""

from __future__ import annotations

# --- fused linear log-probs (kernels/linear_logprobs.py) -------------------------------------

# Token block (16-bit inputs). 64 rows are one Hopper warpgroup MMA (wgmma has M = 64) and four
# 16-row mma.sync tiles on Ampere; with BV = 128 the fp32 logits tile [64, 128] costs 32
# registers per thread at 8 warps, leaving room for the softmax epilogue.
LLP_BN = 64

# Token block of the plain 16-bit forward (log-probs and lse only: no bias, soft-cap, extra
# statistic or top-k; bf16) at large N. Per FLOP a [BN, BV] tile streams (1 / BN + 1 / BV) of
# operand bytes from L2, so 128 x 128 moves a third less than 64 x 128 through the L2 -> SM path
# that bounds the forward at the published shapes. It compiles at 255 registers with no spill
# on sm_80 and sm_90a (one program per SM); the feature-rich and backward kernels spill at 128
# rows and stay at 64. Below LLP_LARGE_N_MIN tokens (64 blocks of 128) the vocab splits needed
# to fill 132 SMs would grow and two resident 64-row programs hide latency better.
LLP_BN_LARGE = 128
LLP_LARGE_N_MIN = 8192

# Token block for fp32 inputs. Their default dot is IEEE fp32 on CUDA cores (no tensor cores),
# whose [64, 128] tile needs 200-255 registers per thread and spilled on sm_90a in the build
# report; 32 rows stay under 200 registers on sm_80 and sm_90a with no spill.
LLP_BN_FP32 = 32

# Token block for tiny batches (N <= LLP_SMALL_N_MAX, e.g. scoring a few sequences in RL). 16 is
# the smallest M that tl.dot accepts; with BN = 64 three quarters of every MMA would be padding.
LLP_BN_SMALL = 16
LLP_SMALL_N_MAX = 16

# Vocab block. 128 columns keep W tiles [BD, BV] at 16 KiB per pipeline stage in bf16 and give
# the online log-sum-exp 128 logits per rescale; 256 would double the fp32 tile registers.
LLP_BV = 128

# Hidden chunk for 16-bit inputs: 64 elements = 128 bytes, one full swizzled shared-memory row
# and the K-depth of 4 bf16 wgmma steps. Per stage: h [64, 64] 8 KiB + W [64, 128] 16 KiB.
LLP_BD_16BIT = 64

# Hidden chunk for fp32 inputs: half the elements, so a row of the tile is the same 128 bytes.
LLP_BD_FP32 = 32

# Warps per program of the tile kernels: 8 warps (2 warpgroups) split the [64, 128] fp32 tile so
# the exp / where / sum epilogue fits: 124-192 registers per thread for bf16 on sm_90a. With 4
# warps the same kernels reached 255 registers and spilled (8-232 bytes) on sm_80 and sm_90a.
LLP_NUM_WARPS = 8

# Software-pipelining depth over the hidden chunks: 3 stages hide global-load latency. Shared
# memory of the bf16 BN = 64 tile kernels: 72 KiB on sm_90a, 48 KiB on sm_80 (under the 164 KiB
# of an A100 and the 228 KiB of an H100, so two programs could share an SM by memory).
LLP_NUM_STAGES = 3

# Forward vocab split: aim for this many programs per streaming multiprocessor, so that a small
# token count (few token blocks) still fills the GPU. Two resident programs per SM overlap one
# program's epilogue with the other's loads.
LLP_PROGRAMS_PER_SM = 2
# ... where two fit: the kernel report gives the plain 16-bit forward at BN <= 64 about 124
# registers x 256 threads (two programs per SM's 64k registers); the feature-rich builds
# (182-222 registers) and the 128-row tile (255) fit one, so the split count aims at one program
# per SM for them (more splits would only add combine work and fp32 partials).
LLP_PROGRAMS_PER_SM_LARGE = 1


# Upper bound on vocab splits. The combine kernel loops over splits, so this only bounds the
# [5, splits, N] fp32 partials workspace and keeps at least V / (128 * 128) blocks per split.
LLP_MAX_SPLITS = 128

# Rows per program of the split-combine kernel: it reads 5 fp32 values per row and split, a
# purely memory-bound pass; 128 rows = 512 contiguous bytes per plane and split per program.
LLP_COMBINE_BN = 128
LLP_COMBINE_NUM_WARPS = 4
LLP_COMBINE_NUM_STAGES = 1  # no tl.dot: nothing for the software pipeliner to overlap

# With a top-k side output every program also keeps a running [BN, KP] list of values and ids
# (KP up to 64) and a [BN, BV] candidate copy. The forward at BN = 64 then reached 255 registers
# and spilled in the build report; BN <= 32 does not. A 16-row tile gets 4 warps (8 spilled
# 32-68 bytes at 128 registers). The combine kernel merges splits' lists: 32 rows at 4 warps.
LLP_BN_TOPK = 32
LLP_NUM_WARPS_TOPK_SMALL = 4
LLP_COMBINE_BN_TOPK = 32

# Grouped tile order of the backward's recompute kernel: GROUP_N token blocks x every vocab block
# of the chunk, then the next group. At N = 16384, H = 2048 the hidden states (67 MB) exceed an
# H100's 50 MB L2; walking token blocks fastest would stream all of them from HBM once per
# vocab block (~130 GB at V = 248320). A group of 8 keeps 8 x 64 rows of h (2 MiB) hot while
# the wave of ~264 programs reads ~33 W blocks (17 MiB), each shared by the 8 token blocks.
LLP_GROUP_N = 8

# Backward workspace floor, in elements. The backward writes the raw-logit gradient dr of one
# vocabulary chunk ([N, vocab chunk]) in the matmul dtype, then hands it to two cuBLAS GEMMs.
# The chunk holds at most max(N * H, this floor) elements:
# never more than the hidden states themselves once they pass 64 Mi elements (128 MiB in bf16),
# and large enough below that for GEMMs that fill an H100.
LLP_WORKSPACE_FLOOR_ELEMS = 1 << 26

# Block-sparse backward products (gradient filtering): each program owns a [BN, BH] tile of the
# fp32 dh accumulator or a [BV, BH] tile of dW and loops over the live [BN, BV] workspace tiles.
# 128 hidden columns keep the 16-bit accumulators at 32 / 64 fp32 registers per thread at 8 warps
# (a [64, 128] / [128, 128] tile, tiles that build without spills in the kernel report);
# fp32 operands (IEEE dots on CUDA cores, or fp16's fp32 workspace) take half the columns.
LLP_SPARSE_BH = 128
LLP_SPARSE_BH_FP32 = 64
# The loop body is conditional on a loaded flag, so deep software pipelining buys little.
LLP_SPARSE_NUM_STAGES = 2

# --- fused two-head divergences (kernels/linear_divergence.py) ----------------------------------

# Two logits tiles live at once (student and teacher) plus, in the backward, their soft-cap
# derivatives: twice the fp32 tile registers of the log-prob family at the same tile. The vocab
# block is halved instead of the token block so that BN stays a full wgmma M (64) and both heads
# still share each [BN, BV] pass: [64, 64] x 2 tiles = the registers of one [64, 128] tile.
LDIV_BV = 64
# Token block for 16-bit matmuls with N > 16: LLP_BN (a full wgmma M).
LDIV_NUM_WARPS = 8
# Token blocks of 16 rows (N <= 16, and every fp32 matmul, whose IEEE dots run on CUDA cores
# where a smaller M costs little): 2 pipeline stages. The build report (sm_80, sm_90a) showed
# 8-76 byte spills at 3 stages or 4 warps for BN 16 / 32 with the two heads' loops and pointers
# live at once, and none at 8 warps and 2 stages for BN 16; fp32 at BN 32 still spilled on sm_80.
LDIV_BN_FP32 = 16
LDIV_NUM_STAGES_SMALL = 2
LDIV_NUM_STAGES = 3
# The logits launchers (both heads' logits given): no tl.dot, a memory-bound sweep over [N, V]
# twice per pass; [32, 128] tiles at 8 warps, no pipelining (nothing to pipeline). The build
# report showed small spills at [64, 64] (sm_90a pass 1), [16, 256] and [32, 128] with 4 warps.
LDIV_LOGITS_BN = 32
LDIV_LOGITS_BV = 128
LDIV_LOGITS_NUM_STAGES = 1
# Rows per program of the pass-1 combine kernel (reads 5-6 fp32 planes per split: memory-bound).
LDIV_COMBINE_BN = 128

# --- every family -------------------------------------------------------------------------------

# Streaming multiprocessors assumed when the device cannot be asked (the interpreter on CPU):
# an H100 SXM has 132. It only changes the number of vocab splits, not the result beyond
# floating-point summation order.
DEFAULT_SM_COUNT = 132

# --- log-probs on given logits (kernels/logprobs.py) --------------------------------------------

# Forward: one row per program (a row of a 128k vocabulary is 256 KiB in bf16: enough work per
# program), swept in vocab blocks of 4096. 4096 fp32 values over 8 warps = 16 per thread (four
# 128-bit loads for fp32, two for bf16): enough bytes in flight per row to stay memory-bound
# while the row loop's block reductions stay cheap. Real vocabularies (32k-256k) take 8-63
# iterations; small V just masks the tail.
LP_FWD_BN = 1
LP_FWD_BV = 4096
LP_FWD_NUM_WARPS = 8
# No software pipelining: the loops hold no tl.dot, so Triton would not pipeline their loads
# through shared memory anyway; several resident rows per SM hide the latency.
LP_NUM_STAGES = 1
# Backward: a pure elementwise map over a (rows, vocab blocks) grid with no loop; 2048 elements
# over 4 warps (16 per thread) keeps the grid's vocab axis at <= 75 blocks for V = 152k and
# enough independent programs for small N.
LP_BWD_BN = 1
LP_BWD_BV = 2048
LP_BWD_NUM_WARPS = 4
