"""A bit-exact simulator of VTA executing binary instruction streams, with a cycle estimate.

It decodes the stream's bits (runtime/vta_isa.py) and runs them as the hardware does (Moreau et
al., arXiv 1807.04188, section 3): fetch routes each instruction to the load (LOAD of inputs and
weights), compute (GEMM, ALU, FINISH, LOAD of micro-ops and accumulators) or store (STORE)
module; each module runs its queue in order and blocks on its pop flags until the neighbouring
module has pushed a token (four one-bit token queues: load<->compute, compute<->store). A stream
that can never make progress is refused as a deadlock, naming the instruction.

Arithmetic is that of the int8/int32 datapath: GEMM accumulates int8 x int8 products into int32
accumulators with two's-complement wrap-around; ALU MIN/MAX/ADD/SHR act on int32 with a
sign-extended 16-bit immediate or a second accumulator (SHR by the low LOG_ACC_WIDTH bits of its
operand, signed); and every GEMM or ALU write also writes the low 8 bits of the result into the
output buffer (truncation, not saturation), which is all STORE moves to DRAM. As in the HLS source
of the bitstreams: a GEMM reset zeroes the accumulator but still writes the low 8 bits of
accumulator plus product to the output buffer; ALU ignores the reset bit; only input LOADs pad;
a micro-op LOAD reads `x_size` micro-ops and no other field; a stream must leave the four token
queues empty.

Every buffer carries a leading image axis: the same stream runs on many images at once (their
input DRAM images differ; micro-ops, weights and biases are shared), which is how whole test
sets are simulated. Index arithmetic wraps at each buffer's depth, as the hardware's index
registers do; a DRAM access outside its image is refused.

Cycles: each module advances its own clock by each instruction's estimated duration, starting it
no earlier than the tokens it pops were pushed, so load, compute and store overlap as far as the
stream's dependencies allow. Durations: a memory instruction takes `MEM_LATENCY` plus one bus beat
per `bus_bytes` moved per row plus one cycle per padding element; GEMM one cycle per micro-op
iteration (the core's initiation interval of 1) plus `PIPELINE_DEPTH`; ALU one cycle per
iteration with an immediate and two with a vector operand (two accumulator reads). These are
estimates of the HLS design's schedule, not measurements of a board.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from accelc.errors import UsageError
from accelc.runtime import vta_isa as isa
from accelc.runtime.vta_config import VTAConfig

MEM_LATENCY = 32
PIPELINE_DEPTH = 4
GEMM_GROUP = 64  # micro-ops summed per float32 product: 64 * 16 * 2^14 = 2^24
MODULES = ("load", "compute", "store")


@dataclass
class Dram:
    """The DRAM images of one stream, in element units of their buffers (VTA's top-level pointers)."""

    uop: np.ndarray  # int64 (n, 3): dst, src, wgt
    inp: np.ndarray  # int8 (images, n, batch, block_in)
    wgt: np.ndarray  # int8 (n, block_out, block_in)
    acc: np.ndarray  # int32 (n, batch, block_out): biases
    out: np.ndarray  # int8 (images, n, batch, block_out): written by STORE


@dataclass
class Stats:
    instructions: Counter = field(default_factory=Counter)
    cycles: int = 0
    busy: dict = field(default_factory=lambda: dict.fromkeys(MODULES, 0))
    macs: int = 0  # int8 multiply-accumulates the GEMM core performed (per image)

    def to_json(self) -> dict:
        return {
            "instructions": dict(self.instructions),
            "cycles": self.cycles,
            "busy": dict(self.busy),
            "macs": self.macs,
        }


def wrap32(x: np.ndarray) -> np.ndarray:
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def low8(x: np.ndarray) -> np.ndarray:
    return (((x + 128) & 255) - 128).astype(np.int8)


def module_of(insn: isa.Insn) -> str:
    if isinstance(insn, isa.MemInsn):
        if insn.opcode == isa.STORE:
            return "store"
        return "load" if insn.memory_type in (isa.MEM_INP, isa.MEM_WGT) else "compute"
    return "compute"


class Simulator:
    def __init__(self, config: VTAConfig, images: int):
        self.config = config
        b, n = config.batch, config.block
        self.uop = np.zeros((config.depth("uop"), 3), dtype=np.int64)
        self.inp = np.zeros((images, config.depth("inp"), b, n), dtype=np.int8)
        self.wgt = np.zeros((config.depth("wgt"), n, n), dtype=np.int8)
        self.acc = np.zeros((images, config.depth("acc"), b, n), dtype=np.int64)  # int32 values
        self.out = np.zeros((images, config.depth("out"), b, n), dtype=np.int8)
        self.stats = Stats()

    # ------------------------------------------------------------------ the run
    def run(self, stream: bytes, dram: Dram) -> Stats:
        insns = isa.decode(stream, self.config)
        if not insns or not isinstance(insns[-1], isa.FinishInsn):
            raise UsageError("instruction stream does not end with FINISH")
        queues = {m: deque() for m in MODULES}
        for index, insn in enumerate(insns):
            queues[module_of(insn)].append((index, insn))
        # token queues hold the cycle each token was pushed at
        tokens = {
            pair: deque()
            for pair in (("load", "compute"), ("compute", "load"), ("compute", "store"), ("store", "compute"))
        }
        clock = dict.fromkeys(MODULES, 0)
        neighbours = {"load": (None, "compute"), "compute": ("load", "store"), "store": ("compute", None)}
        while any(queues.values()):
            ready = []
            for m in MODULES:
                if not queues[m]:
                    continue
                index, insn = queues[m][0]
                prev, nxt = neighbours[m]
                needs = [(p, m) for p, flag in ((prev, insn.deps.pop_prev), (nxt, insn.deps.pop_next)) if flag]
                if any(src is None for src, _ in needs):
                    raise UsageError(
                        f"instruction {index} ({isa.describe(insn)}) pops from a module {m} has no link to"
                    )
                if all(tokens[pair] for pair in needs):
                    start = max([clock[m]] + [tokens[pair][0] for pair in needs])
                    ready.append((start, MODULES.index(m), m, needs))
            if not ready:
                heads = {m: isa.describe(q[0][1]) + f" (instruction {q[0][0]})" for m, q in queues.items() if q}
                raise UsageError(f"instruction stream deadlocks: every module waits for a token: {heads}")
            start, _, m, needs = min(ready)
            index, insn = queues[m].popleft()
            for pair in needs:
                tokens[pair].popleft()
            cycles = self._execute(index, insn, dram)
            clock[m] = start + cycles
            self.stats.busy[m] += cycles
            self.stats.instructions[isa.name(insn)] += 1
            prev, nxt = neighbours[m]
            if insn.deps.push_prev:
                self._push(tokens, m, prev, clock[m], index, insn)
            if insn.deps.push_next:
                self._push(tokens, m, nxt, clock[m], index, insn)
        left = {f"{a}->{b}": len(q) for (a, b), q in tokens.items() if q}
        if left:  # the hardware asserts its token queues are empty when a stream finishes
            raise UsageError(f"instruction stream leaves dependency tokens behind: {left}")
        self.stats.cycles = max(clock.values())
        return self.stats

    @staticmethod
    def _push(tokens, src, dst, at, index, insn) -> None:
        if dst is None:
            raise UsageError(f"instruction {index} ({isa.describe(insn)}) pushes to a module {src} has no link to")
        tokens[(src, dst)].append(at)

    def _execute(self, index: int, insn, dram: Dram) -> int:
        if isinstance(insn, isa.MemInsn):
            return self._load(index, insn, dram) if insn.opcode == isa.LOAD else self._store(index, insn, dram)
        if isinstance(insn, isa.GemmInsn):
            return self._gemm(insn)
        if isinstance(insn, isa.AluInsn):
            return self._alu(insn)
        return 1

    # ------------------------------------------------------------------ memory
    def _rows(self, index: int, insn: isa.MemInsn, length: int, what: str) -> np.ndarray:
        """DRAM element indices of the copy's rows (y_size x x_size), refused outside the image."""
        rows = insn.dram_base + insn.x_stride * np.arange(insn.y_size)[:, None] + np.arange(insn.x_size)[None, :]
        if rows.size and rows.max() >= length:
            raise UsageError(
                f"instruction {index} ({isa.describe(insn)}) reads or writes {what} DRAM element {rows.max()} "
                f"of an image of {length}"
            )
        return rows

    def _mem_cycles(self, insn: isa.MemInsn, elem_bytes: int, padded: int) -> int:
        beats = -(-insn.x_size * elem_bytes // self.config.bus_bytes)
        return MEM_LATENCY + insn.y_size * beats + padded

    def _load(self, index: int, insn: isa.MemInsn, dram: Dram) -> int:
        name = isa.MEMORIES.get(insn.memory_type)
        if name not in ("uop", "wgt", "inp", "acc"):
            raise UsageError(
                f"instruction {index}: LOAD of memory type {insn.memory_type} (allowed: uop, wgt, inp, acc)"
            )
        source = getattr(dram, name)
        buffer = getattr(self, name)
        depth = self.config.depth(name)
        if name == "uop":  # x_size micro-ops from dram_base: the hardware reads no other field
            at = insn.dram_base + np.arange(insn.x_size)
            if insn.x_size and at[-1] >= len(source):
                raise UsageError(f"instruction {index}: LOAD of micro-ops past the end of their image ({len(source)})")
            buffer[(insn.sram_base + np.arange(insn.x_size)) % depth] = source[at]
            return self._mem_cycles(insn, self.config.elem_bytes(name), 0)
        if name != "inp":  # weights and biases: rows placed one after another, padding fields unused
            rows = self._rows(index, insn, len(source), name).reshape(-1)
            dest = (insn.sram_base + np.arange(rows.size)) % depth
            if name == "wgt":
                buffer[dest] = source[rows]
            else:  # biases are shared by every image
                buffer[:, dest] = source[rows][None]
            return self._mem_cycles(insn, self.config.elem_bytes(name), 0)
        # inputs: each image's rows, with zero padding around them in the buffer
        rows = self._rows(index, insn, source.shape[1], name)
        height = insn.y_pad_0 + insn.y_size + insn.y_pad_1
        width = insn.x_pad_0 + insn.x_size + insn.x_pad_1
        block = np.zeros((source.shape[0], height, width) + source.shape[2:], dtype=buffer.dtype)
        block[:, insn.y_pad_0 : insn.y_pad_0 + insn.y_size, insn.x_pad_0 : insn.x_pad_0 + insn.x_size] = source[:, rows]
        dest = (insn.sram_base + np.arange(height * width)) % depth
        buffer[:, dest] = block.reshape((source.shape[0], height * width) + source.shape[2:])
        return self._mem_cycles(insn, self.config.elem_bytes(name), height * width - insn.y_size * insn.x_size)

    def _store(self, index: int, insn: isa.MemInsn, dram: Dram) -> int:
        if insn.memory_type != isa.MEM_OUT:
            raise UsageError(f"instruction {index}: STORE of memory type {insn.memory_type} (allowed: out)")
        rows = self._rows(index, insn, dram.out.shape[1], "out")
        src = (insn.sram_base + np.arange(insn.y_size * insn.x_size)) % self.out.shape[1]
        dram.out[:, rows.reshape(-1)] = self.out[:, src]
        return self._mem_cycles(insn, self.config.elem_bytes("out"), 0)

    # ------------------------------------------------------------------ compute
    def _indices(self, insn: isa.LoopInsn, uop_index: int, src_depth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dst, src, wgt) of every loop iteration of one micro-op, in the hardware's (i, j) order."""
        i = np.arange(insn.iter_out)[:, None]
        j = np.arange(insn.iter_in)[None, :]
        dst_u, src_u, wgt_u = self.uop[uop_index]
        dst = (dst_u + i * insn.dst_factor_out + j * insn.dst_factor_in).reshape(-1) % self.acc.shape[1]
        src = (src_u + i * insn.src_factor_out + j * insn.src_factor_in).reshape(-1) % src_depth
        if isinstance(insn, isa.GemmInsn):
            wgt = (wgt_u + i * insn.wgt_factor_out + j * insn.wgt_factor_in).reshape(-1) % self.wgt.shape[0]
        else:
            wgt = np.zeros_like(dst)
        return dst, src, wgt

    def _gemm(self, insn: isa.GemmInsn) -> int:
        if insn.reset:
            return self._gemm_reset(insn)
        # Accumulation wraps modulo 2^32 and each step is an addition, so the order of the
        # iterations does not change the result. Micro-ops with the same destination (the taps and
        # input blocks of one output block) are summed by one matrix product over all iterations.
        iterations = insn.iter_out * insn.iter_in * max(insn.uop_end - insn.uop_bgn, 0)
        by_dst: dict[int, list[int]] = {}
        for k in range(insn.uop_bgn, insn.uop_end):
            by_dst.setdefault(int(self.uop[k, 0]), []).append(k)
        touched = []
        for ks in by_dst.values():
            dst = self._indices(insn, ks[0], self.inp.shape[1])[0]
            touched.append(dst)
            for at in range(0, len(ks), GEMM_GROUP):
                part = [self._indices(insn, k, self.inp.shape[1]) for k in ks[at : at + GEMM_GROUP]]
                src = np.stack([p[1] for p in part], 1)  # (iterations, micro-ops)
                wgt = np.stack([p[2] for p in part], 1)
                prod = self._products(src, wgt)
                if len(np.unique(dst)) == len(dst):
                    self.acc[:, dst] += prod
                else:
                    np.add.at(self.acc, (slice(None), dst), prod)
            self.stats.macs += len(dst) * len(ks) * self.config.batch * self.config.block**2
        if touched:
            dst = np.unique(np.concatenate(touched))
            self.acc[:, dst] = wrap32(self.acc[:, dst])
            self.out[:, dst] = low8(self.acc[:, dst])
        return iterations + PIPELINE_DEPTH

    def _gemm_reset(self, insn: isa.GemmInsn) -> int:
        """reset: each iteration zeroes acc[dst] yet still writes the low 8 bits of acc[dst] plus
        its product to the output buffer (the HLS datapath computes the sum either way). Exact all
        at once when every destination is hit once; in hardware order otherwise."""
        per_uop = [self._indices(insn, k, self.inp.shape[1]) for k in range(insn.uop_bgn, insn.uop_end)]
        if not per_uop:
            return PIPELINE_DEPTH
        dst, src, wgt = (np.stack(column, 1).reshape(-1) for column in zip(*per_uop))  # (i, j) outer, uop inner
        if len(np.unique(dst)) == len(dst):
            summed = wrap32(self.acc[:, dst] + self._products(src[:, None], wgt[:, None]))
            self.out[:, dst] = low8(summed)
            self.acc[:, dst] = 0
        else:
            for d, s, w in zip(dst, src, wgt):
                summed = wrap32(self.acc[:, [d]] + self._products(np.array([[s]]), np.array([[w]])))
                self.out[:, [d]] = low8(summed)
                self.acc[:, [d]] = 0
        return len(dst) + PIPELINE_DEPTH

    def _products(self, src: np.ndarray, wgt: np.ndarray) -> np.ndarray:
        """sum over micro-ops of inp[src] . wgt[wgt]^T for each iteration: (images, iterations, batch, out)
        as int64. A sum of GEMM_GROUP * BLOCK_IN int8 products stays below 2^24, so float32 BLAS is exact."""
        images, (n, p) = self.inp.shape[0], src.shape
        x = self.inp[:, src]  # (images, n, p, batch, in)
        if np.all(wgt == wgt[:1]):  # the same weights for every iteration (the lowering's case)
            w = self.wgt[wgt[0]].astype(np.float32)  # (p, out, in)
            x = x.transpose(0, 1, 3, 2, 4).reshape(images * n * self.config.batch, -1).astype(np.float32)
            y = x @ w.transpose(0, 2, 1).reshape(p * self.config.block, self.config.block)
            return y.reshape(images, n, self.config.batch, -1).astype(np.int64)
        w = self.wgt[wgt].astype(np.float32)  # (n, p, out, in)
        return np.einsum("mnpbi,npoi->mnbo", x.astype(np.float32), w).astype(np.int64)

    def _alu(self, insn: isa.AluInsn) -> int:
        if insn.alu_opcode not in isa.ALU_OPS:
            raise UsageError(f"ALU opcode {insn.alu_opcode} is not one the bitstream implements (MIN, MAX, ADD, SHR)")
        per_uop = [self._indices(insn, k, self.acc.shape[1])[:2] for k in range(insn.uop_bgn, insn.uop_end)]
        if not per_uop:
            return PIPELINE_DEPTH
        dst = np.stack([d for d, _ in per_uop], 1).reshape(-1)  # (i, j) outer, micro-op inner
        src = np.stack([s for _, s in per_uop], 1).reshape(-1)
        # all at once is exact when no element is written twice and none read after another
        # iteration wrote it; otherwise the iterations run one by one in hardware order
        unique = len(np.unique(dst)) == len(dst)
        clash = not insn.use_imm and np.isin(src, dst).any() and not np.array_equal(src, dst)
        if unique and not clash:
            self._alu_apply(insn, dst, src)
        else:
            for d, s in zip(dst, src):
                self._alu_apply(insn, np.array([d]), np.array([s]))
        return len(dst) * (1 if insn.use_imm else 2) + PIPELINE_DEPTH

    def _alu_apply(self, insn: isa.AluInsn, dst: np.ndarray, src: np.ndarray) -> None:
        a = self.acc[:, dst]
        b = np.int64(insn.imm) if insn.use_imm else self.acc[:, src]
        op = insn.alu_opcode
        if op == isa.ALU_MIN:
            r = np.minimum(a, b)
        elif op == isa.ALU_MAX:
            r = np.maximum(a, b)
        elif op == isa.ALU_ADD:
            r = wrap32(a + b)
        else:  # SHR by a signed LOG_ACC_WIDTH-bit amount; a negative one shifts left
            bits = self.config.LOG_ACC_WIDTH
            s = np.asarray(b) & ((1 << bits) - 1)
            s = np.where(s >= 1 << (bits - 1), s - (1 << bits), s)
            r = np.where(s >= 0, a >> np.maximum(s, 0), wrap32(a << np.maximum(-s, 0)))
        self.acc[:, dst] = r
        self.out[:, dst] = low8(r)


def simulate(config: VTAConfig, stream: bytes, dram: Dram) -> Stats:
    """Run one stream on `dram.inp.shape[0]` images; the results land in `dram.out`."""
    return Simulator(config, dram.inp.shape[0]).run(stream, dram)
