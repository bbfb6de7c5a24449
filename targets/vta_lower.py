"""Lower an int8 conv2d or dense layer to a VTA instruction stream, tiled to the configured buffers.

A dense layer is the 1x1 case of a convolution (H = W = 1), so one lowering serves both. The
layer is cut into tiles: groups of output-channel blocks (`group`), bands of output rows
(`rows`) and chunks of input-channel blocks (`chunk`). Per tile the load module brings the
band's input rows (one 2-D strided LOAD per input-channel block, the convolution's zero padding
added on the fly) and the group's weights; the compute module zeroes the accumulators (GEMM
reset), runs one GEMM over micro-ops (co, ci, kh, kw) looped over the band's rows and columns
(Moreau et al., arXiv 1807.04188, section 3.3), and after the last chunk requantises on the ALU:
ADD the bias (which holds the rounding constant), SHR by the layer's shift, MAX/MIN clip to int8
(MAX 0 is the fused ReLU), and for a fused max pooling the ALU MAX of each window's taps into a
pooled region; the store module moves the int8 results to DRAM.

When two copies of the tile buffers fit, inputs, weights and accumulators are double buffered
(slot = tile mod 2) so loads, compute and stores of neighbouring tiles overlap; the dependency
tokens say exactly when a slot may be reused, and every push has its pop (the token queues are
empty again after FINISH, so the next stream starts clean).

DRAM images (element units of each buffer, VTA's hw_spec layouts): inputs (Cin/16, H, W) blocks
of 16 channels; weights in tile order (group, chunk, co, ci, kh, kw) blocks of 16 x 16 (out, in);
biases (Cout/16) blocks of 16 int32, followed by as many blocks of shifts when each output channel
has its own (an ALU SHR by that vector instead of an immediate); outputs (Cout/16, Ho, Wo).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from accelc.errors import UsageError
from accelc.runtime import vta_isa as isa
from accelc.runtime.vta_config import VTAConfig

NO_DEPS = isa.Deps()
SHIFT_MAX = 15  # a shift the 5-bit signed SHR operand and a 16-bit rounding constant both hold


@dataclass(frozen=True)
class Tiling:
    group: int  # output-channel blocks per tile
    rows: int  # output rows per tile
    chunk: int  # input-channel blocks per tile
    slots: int  # 2: double buffered

    def to_json(self) -> dict:
        return vars(self).copy()


@dataclass(frozen=True)
class Shape:
    cin: int
    cout: int
    height: int
    width: int
    kernel: int
    padding: int
    pool: int = 1  # a fused max pooling (kernel = stride), 1 for none
    channel_shifts: bool = False  # a shift per output channel (ALU SHR by a vector), not one immediate

    @property
    def out_hw(self) -> tuple[int, int]:
        """The convolution's output size (before pooling)."""
        return self.height + 2 * self.padding - self.kernel + 1, self.width + 2 * self.padding - self.kernel + 1

    @property
    def stored_hw(self) -> tuple[int, int]:
        """What reaches DRAM: the pooled output."""
        ho, wo = self.out_hw
        return ho // self.pool, wo // self.pool


@dataclass
class LayerStream:
    insns: bytes
    uops: bytes
    wgt: np.ndarray  # int8 (n, 16, 16)
    acc: np.ndarray  # int32 (n, batch, 16)
    inp_elems: int
    out_elems: int
    tiling: Tiling
    counts: dict


def blocks(n: int, block: int) -> int:
    return -(-n // block)


def _needs(shape: Shape, t: Tiling) -> dict[str, int]:
    wo = shape.out_hw[1]
    k, wp, pool = shape.kernel, shape.width + 2 * shape.padding, shape.pool
    sets = t.slots**3  # micro-op sets: one per (input, weight, accumulator) slot combination
    pooled = t.group * (t.rows // pool) * (wo // pool) if pool > 1 else 0
    pool_uops = (pool * pool + 1) * t.group if pool > 1 else 0
    vectors = 2 if shape.channel_shifts else 1  # biases, and the shifts
    return {
        "inp": t.slots * t.chunk * (t.rows + k - 1) * wp,
        "wgt": t.slots * t.group * t.chunk * k * k,
        "acc": t.slots * (t.group * t.rows * wo + vectors * t.group + pooled),
        "uop": sets * t.group * t.chunk * k * k + t.slots * (vectors * t.group + pool_uops),
    }


def choose_tiling(shape: Shape, config: VTAConfig, where: str) -> Tiling:
    """The tiling with the fewest tiles that fits every buffer (double buffered when possible):
    whole input-channel chunks first (fewer partial sums), then wide groups, then tall bands."""
    cib, cob = blocks(shape.cin, config.block), blocks(shape.cout, config.block)
    ho, wo = shape.out_hw
    if wo >= 1 << isa.LOOP_ITER_BITS or shape.width + 2 * shape.padding >= config.depth("inp"):
        raise UsageError(f"{where}: rows of {shape.width} pixels do not fit the input buffer")
    if ho % shape.pool or wo % shape.pool:
        raise UsageError(f"{where}: a {ho}x{wo} output does not divide into {shape.pool}x{shape.pool} pooling windows")
    best = None
    for slots in (2, 1):
        for chunk in [c for c in range(cib, 0, -1) if cib % c == 0]:
            for group in [g for g in range(cob, 0, -1) if cob % g == 0]:
                # the tallest band that fits, found by halving from the whole height
                rows = ho
                while rows >= 1:
                    if rows % shape.pool:  # a band holds whole pooling windows
                        rows -= 1
                        continue
                    t = Tiling(group, rows, chunk, slots)
                    needs = _needs(shape, t)
                    if all(needs[b] <= config.depth(b) for b in needs):
                        tiles = (cob // group) * blocks(ho, rows) * (cib // chunk)
                        key = (tiles, -slots)
                        if best is None or key < best[0]:
                            best = (key, t)
                        break
                    rows = rows - 1 if rows <= 8 else rows // 2 + (rows % 2)
        if best is not None and best[1].slots == 2:
            break
    if best is None:
        raise UsageError(
            f"{where}: fits no tiling of the {config.tag} buffers (even one 16x16 weight block per "
            f"kernel tap and one output row: input {config.depth('inp')}, weight {config.depth('wgt')}, "
            f"accumulator {config.depth('acc')} elements)"
        )
    return best[1]


def with_deps(insn: isa.MemInsn, **flags) -> isa.MemInsn:
    return replace(insn, deps=replace(insn.deps, **flags))


def pack_weights(w: np.ndarray, shape: Shape, t: Tiling, block: int) -> np.ndarray:
    """int8 OIHW weights -> DRAM image of 16x16 (out, in) blocks in tile order."""
    cib, cob, k = blocks(shape.cin, block), blocks(shape.cout, block), shape.kernel
    padded = np.zeros((cob * block, cib * block, k, k), dtype=np.int8)
    padded[: shape.cout, : shape.cin] = w.reshape(shape.cout, shape.cin, k, k)
    # (group, co, o16, chunk, ci, i16, kh, kw) -> (group, chunk, co, ci, kh, kw, o16, i16)
    x = padded.reshape(cob // t.group, t.group, block, cib // t.chunk, t.chunk, block, k, k)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 4, 6, 7, 2, 5)).reshape(-1, block, block)


def lower_layer(
    w: np.ndarray, bias: np.ndarray, shift, low: int, shape: Shape, config: VTAConfig, where: str
) -> LayerStream:
    """The stream computing clip((conv(x, w) + bias) >> shift, low, 127) in int8 for one image, max
    pooled by `shape.pool` when it is more than 1. `shift` is one int, or one per output channel
    (a list or array: an ALU SHR by a vector of shifts held beside the biases)."""
    if config.batch != 1:
        raise UsageError(f"{where}: lowering supports BATCH=1 configurations, not {config.batch}")
    shifts = np.asarray(shift, dtype=np.int64)
    if shifts.size == 0 or not 0 <= shifts.min() <= shifts.max() <= SHIFT_MAX:
        raise UsageError(f"{where}: requantisation shift {shift} is outside 0..{SHIFT_MAX}")
    if shifts.ndim != int(shape.channel_shifts) or (shifts.ndim and len(shifts) != shape.cout):
        raise UsageError(f"{where}: expected {'one shift per output channel' if shape.channel_shifts else 'one shift'}")
    t = choose_tiling(shape, config, where)
    block, k, p = config.block, shape.kernel, shape.padding
    cib, cob = blocks(shape.cin, block), blocks(shape.cout, block)
    ho, wo = shape.out_hw
    wp = shape.width + 2 * p
    band = t.rows + k - 1  # input rows held per band
    inp_slot = t.chunk * band * wp
    wgt_slot = t.group * t.chunk * k * k
    acc_slot = t.group * t.rows * wo
    bias_base = t.slots * acc_slot
    pool = shape.pool
    pho, pwo = shape.stored_hw
    pool_slot = t.group * (t.rows // pool) * (wo // pool)  # the pooled band, after the biases
    pool_base = bias_base + t.slots * t.group
    shift_base = pool_base + (t.slots * pool_slot if pool > 1 else 0)  # per-channel shifts, when given

    uops: list[isa.Uop] = []
    gemm_sets: dict[tuple[int, int, int], tuple[int, int]] = {}
    row_sets: dict[tuple[int, int], tuple[int, int]] = {}  # per accumulator slot and vector: one per output block

    def gemm_uops(islot: int, wslot: int, aslot: int) -> tuple[int, int]:
        if (islot, wslot, aslot) not in gemm_sets:
            start = len(uops)
            for co in range(t.group):
                for ci in range(t.chunk):
                    for kh in range(k):
                        for kw in range(k):
                            uops.append(
                                isa.Uop(
                                    dst=aslot * acc_slot + co * t.rows * wo,
                                    src=islot * inp_slot + ci * band * wp + kh * wp + kw,
                                    wgt=wslot * wgt_slot + ((co * t.chunk + ci) * k + kh) * k + kw,
                                )
                            )
            gemm_sets[(islot, wslot, aslot)] = (start, len(uops))
        return gemm_sets[(islot, wslot, aslot)]

    def row_uops(aslot: int, base: int = bias_base) -> tuple[int, int]:
        """Per output block: dst its accumulators, src its vector at `base` (the biases or the shifts)."""
        if (aslot, base) not in row_sets:
            start = len(uops)
            for co in range(t.group):
                uops.append(isa.Uop(dst=aslot * acc_slot + co * t.rows * wo, src=base + aslot * t.group + co, wgt=0))
            row_sets[(aslot, base)] = (start, len(uops))
        return row_sets[(aslot, base)]

    pool_sets: dict[tuple[int, int], tuple[int, int]] = {}

    def pool_uops(aslot: int, tap: int) -> tuple[int, int]:
        """Per output block: dst the pooled band, src the window's tap (-1: none, for the reset)."""
        if (aslot, tap) not in pool_sets:
            start = len(uops)
            dy, dx = divmod(max(tap, 0), pool)
            for co in range(t.group):
                dst = pool_base + aslot * pool_slot + co * (t.rows // pool) * (wo // pool)
                uops.append(isa.Uop(dst=dst, src=aslot * acc_slot + co * t.rows * wo + dy * wo + dx, wgt=0))
            pool_sets[(aslot, tap)] = (start, len(uops))
        return pool_sets[(aslot, tap)]

    def copy(opcode: int, memory: int, sram: int, dram: int, rows: int, size: int, stride: int, pads=(0, 0, 0, 0)):
        return isa.MemInsn(opcode, NO_DEPS, memory, sram, dram, rows, size, stride, *pads)

    def loop(uops_range: tuple[int, int], rows: int, src_factor_out: int, src_factor_in: int, cols: int = wo) -> dict:
        """Micro-ops over a band: rows x cols, destinations row-major."""
        return dict(uop_bgn=uops_range[0], uop_end=uops_range[1], iter_out=rows, iter_in=cols, dst_factor_out=cols,
                    dst_factor_in=1, src_factor_out=src_factor_out, src_factor_in=src_factor_in)  # fmt: skip

    groups, bands, chunks = cob // t.group, blocks(ho, t.rows), cib // t.chunk
    tiles = [(g, r, c) for g in range(groups) for r in range(bands) for c in range(chunks)]
    n_tiles, n_out, d = len(tiles), groups * bands, t.slots
    program: list[isa.Insn] = []
    for ti, (g, r, c) in enumerate(tiles):
        o = g * bands + r  # the output tile (group, band) whose accumulators this tile adds to
        y0, rows = r * t.rows, min(t.rows, ho - r * t.rows)
        islot, aslot = ti % d, o % d
        wslot = g % d if chunks == 1 else ti % d

        loads = []
        if chunks > 1 or r == 0:  # with one chunk, a group's weights stay while its bands pass
            loads.append(
                copy(isa.LOAD, isa.MEM_WGT, wslot * wgt_slot, (g * chunks + c) * wgt_slot, 1, wgt_slot, wgt_slot)
            )
        y_first = y0 - p  # first input row of the band (above the image: padding)
        top, bottom = max(0, -y_first), max(0, y_first + rows + k - 1 - shape.height)
        plane = shape.height * shape.width
        if p == 0 and band == shape.height:  # whole, unpadded images: the chunk is one contiguous copy
            size = t.chunk * plane
            loads.append(copy(isa.LOAD, isa.MEM_INP, islot * inp_slot, c * size, 1, size, size))
        else:  # one 2-D copy per input-channel block, the zero padding added on the way
            for ci in range(t.chunk):
                dram = (c * t.chunk + ci) * plane + (y_first + top) * shape.width
                sram = islot * inp_slot + ci * band * wp
                loads.append(copy(isa.LOAD, isa.MEM_INP, sram, dram, rows + k - 1 - top - bottom, shape.width,
                                  shape.width, (top, bottom, p, p)))  # fmt: skip
        # the slot it overwrites was read by the GEMM of tile ti - d; compute is told when it lands
        loads[0] = with_deps(loads[0], pop_next=ti >= d)
        loads[-1] = with_deps(loads[-1], push_next=True)
        program += loads

        if c == 0:  # a new output tile: its biases, and zeroed accumulators once its slot is stored
            program.append(copy(isa.LOAD, isa.MEM_ACC, bias_base + aslot * t.group, g * t.group, 1, t.group, t.group))
            if shape.channel_shifts:  # the shifts sit after the biases in the accumulator image
                program.append(
                    copy(isa.LOAD, isa.MEM_ACC, shift_base + aslot * t.group, cob + g * t.group, 1, t.group, t.group)
                )
            reset = loop(row_uops(aslot), rows, 0, 0)
            program.append(isa.GemmInsn(isa.Deps(pop_next=o >= d), True, **reset, wgt_factor_out=0, wgt_factor_in=0))
        gemm = loop(gemm_uops(islot, wslot, aslot), rows, wp, 1)
        deps = isa.Deps(pop_prev=True, push_prev=ti + d < n_tiles)
        program.append(isa.GemmInsn(deps, False, **gemm, wgt_factor_out=0, wgt_factor_in=0))
        if c < chunks - 1:
            continue
        row = loop(row_uops(aslot), rows, 0, 0)  # src: the output block's bias, for every pixel
        requantise = [isa.AluInsn(NO_DEPS, False, **row, alu_opcode=isa.ALU_ADD, use_imm=False, imm=0)]
        if shape.channel_shifts:
            by_channel = loop(row_uops(aslot, shift_base), rows, 0, 0)
            requantise.append(isa.AluInsn(NO_DEPS, False, **by_channel, alu_opcode=isa.ALU_SHR, use_imm=False, imm=0))
        elif shift:
            requantise.append(isa.AluInsn(NO_DEPS, False, **row, alu_opcode=isa.ALU_SHR, use_imm=True, imm=int(shift)))
        clip = [(isa.ALU_MAX, low), (isa.ALU_MIN, 127)]
        requantise += [isa.AluInsn(NO_DEPS, False, **row, alu_opcode=op, use_imm=True, imm=imm) for op, imm in clip]
        if pool > 1:
            # max pooling on the ALU: the pooled band starts at `low` (below or at every clipped
            # value), then takes the MAX with each tap of the window
            prows = rows // pool
            reset = loop(pool_uops(aslot, -1), prows, 0, 0, wo // pool)
            requantise.append(isa.GemmInsn(NO_DEPS, True, **reset, wgt_factor_out=0, wgt_factor_in=0))
            if low:
                requantise.append(isa.AluInsn(NO_DEPS, False, **reset, alu_opcode=isa.ALU_ADD, use_imm=True, imm=low))
            for tap in range(pool * pool):
                taps = loop(pool_uops(aslot, tap), prows, pool * wo, pool, wo // pool)
                requantise.append(isa.AluInsn(NO_DEPS, False, **taps, alu_opcode=isa.ALU_MAX, use_imm=False, imm=0))
        requantise[-1] = replace(requantise[-1], deps=isa.Deps(push_next=True))
        program += requantise
        if pool > 1:
            size = (rows // pool) * pwo
            stores = [
                copy(isa.STORE, isa.MEM_OUT, pool_base + aslot * pool_slot + co * (t.rows // pool) * pwo,
                     (g * t.group + co) * pho * pwo + (y0 // pool) * pwo, 1, size, size)
                for co in range(t.group)
            ]  # fmt: skip
        else:
            stores = [
                copy(isa.STORE, isa.MEM_OUT, aslot * acc_slot + co * t.rows * wo, (g * t.group + co) * ho * wo + y0 * wo,
                     1, rows * wo, rows * wo)
                for co in range(t.group)
            ]  # fmt: skip
        stores[0] = with_deps(stores[0], pop_prev=True)
        # the token frees this slot for output tile o + d, or (the last) lets FINISH wait for it
        stores[-1] = with_deps(stores[-1], push_prev=o + d < n_out or o == n_out - 1)
        program += stores
    program.append(isa.FinishInsn(isa.Deps(pop_next=True)))
    if len(uops) > config.depth("uop"):
        raise UsageError(f"{where}: {len(uops)} micro-ops exceed the micro-op buffer ({config.depth('uop')})")
    program.insert(0, copy(isa.LOAD, isa.MEM_UOP, 0, 0, 1, len(uops), len(uops)))  # first on the compute queue

    acc = np.zeros((cob * block,), dtype=np.int64)
    acc[: shape.cout] = bias
    if np.abs(acc).max(initial=0) >= 1 << 31:
        raise UsageError(f"{where}: a bias does not fit int32")
    if shape.channel_shifts:
        vector = np.zeros((cob * block,), dtype=np.int64)
        vector[: shape.cout] = shifts
        acc = np.concatenate([acc, vector])
    counts = Counter(isa.name(insn) for insn in program)
    return LayerStream(
        insns=isa.encode(program, config),
        uops=isa.encode_uops(uops, config),
        wgt=pack_weights(w, shape, t, block),
        acc=acc.astype(np.int32).reshape(-1, 1, block),
        inp_elems=cib * shape.height * shape.width,
        out_elems=cob * pho * pwo,
        tiling=t,
        counts={**{n: counts[n] for n in isa.OPCODES.values()}, "uops": len(uops)},
    )
