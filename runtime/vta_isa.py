"""VTA's instruction set: 128-bit LOAD/STORE/GEMM/ALU/FINISH instructions and 32-bit micro-ops.

Written from the published layouts (Moreau et al., arXiv 1807.04188, section 3.2 and figure 6;
the bit widths of VTA's `hw_spec.h` as tabulated in docs/fpga.md): an instruction is two
little-endian 64-bit words, fields packed from the least significant bit; a field never straddles
the two words (the C bit-field rule of the hardware's own headers), so the second word starts
with the memory instruction's `y_size` and with the GEMM/ALU index factors. Widths that depend on
the buffer depths come from the configuration (runtime/vta_config.py).

Encoding is exact both ways: `decode(encode(x)) == x` for every in-range value, and a value that
does not fit its field is refused rather than silently truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from accelc.errors import InternalError, UsageError
from accelc.runtime.vta_config import INSN_BYTES, VTAConfig

LOAD, STORE, GEMM, FINISH, ALU = 0, 1, 2, 3, 4
OPCODES = {LOAD: "LOAD", STORE: "STORE", GEMM: "GEMM", FINISH: "FINISH", ALU: "ALU"}
MEM_UOP, MEM_WGT, MEM_INP, MEM_ACC, MEM_OUT = 0, 1, 2, 3, 4
MEMORIES = {MEM_UOP: "uop", MEM_WGT: "wgt", MEM_INP: "inp", MEM_ACC: "acc", MEM_OUT: "out"}
ALU_MIN, ALU_MAX, ALU_ADD, ALU_SHR = 0, 1, 2, 3
ALU_OPS = {ALU_MIN: "MIN", ALU_MAX: "MAX", ALU_ADD: "ADD", ALU_SHR: "SHR"}  # the HLS bitstream's set
LOOP_ITER_BITS = 14
IMM_BITS = 16


@dataclass(frozen=True)
class Deps:
    """The four dependency flags: pop a token from / push a token to the previous / next module."""

    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False


@dataclass(frozen=True)
class MemInsn:
    """LOAD (DRAM -> buffer) or STORE (output buffer -> DRAM): a 2-D strided copy of `y_size` rows of
    `x_size` elements, `x_stride` apart in DRAM, with zero padding added around it in the buffer."""

    opcode: int
    deps: Deps
    memory_type: int
    sram_base: int
    dram_base: int
    y_size: int
    x_size: int
    x_stride: int
    y_pad_0: int = 0
    y_pad_1: int = 0
    x_pad_0: int = 0
    x_pad_1: int = 0


@dataclass(frozen=True)
class LoopInsn:
    """The part GEMM and ALU share: micro-ops [uop_bgn, uop_end) run in a two-level loop whose
    indices add `*_factor_out` per outer and `*_factor_in` per inner iteration (reset: acc = 0)."""

    deps: Deps
    reset: bool
    uop_bgn: int
    uop_end: int
    iter_out: int
    iter_in: int
    dst_factor_out: int
    dst_factor_in: int
    src_factor_out: int
    src_factor_in: int


@dataclass(frozen=True)
class GemmInsn(LoopInsn):
    """acc[dst] += inp[src] . wgt[wgt]^T over the loop."""

    wgt_factor_out: int
    wgt_factor_in: int


@dataclass(frozen=True)
class AluInsn(LoopInsn):
    """acc[dst] = op(acc[dst], imm if use_imm else acc[src]) over the loop."""

    alu_opcode: int
    use_imm: bool
    imm: int


@dataclass(frozen=True)
class FinishInsn:
    deps: Deps


Insn = MemInsn | GemmInsn | AluInsn | FinishInsn


@dataclass(frozen=True)
class Uop:
    dst: int  # accumulator index
    src: int  # input index (GEMM) or accumulator index (ALU)
    wgt: int  # weight index (GEMM)


def _layouts(config: VTAConfig) -> dict[str, tuple[list, list]]:
    """Field name -> bit width of each 64-bit word, per instruction format."""
    acc, inp, wgt, uop = (config.log_depth(n) for n in ("acc", "inp", "wgt", "uop"))
    head = [("opcode", 3), ("pop_prev", 1), ("pop_next", 1), ("push_prev", 1), ("push_next", 1)]
    loop = [
        ("reset", 1),
        ("uop_bgn", uop),
        ("uop_end", uop + 1),
        ("iter_out", LOOP_ITER_BITS),
        ("iter_in", LOOP_ITER_BITS),
    ]
    return {
        "mem": (
            head + [("memory_type", 3), ("sram_base", 16), ("dram_base", 32)],
            [
                ("y_size", 16),
                ("x_size", 16),
                ("x_stride", 16),
                ("y_pad_0", 4),
                ("y_pad_1", 4),
                ("x_pad_0", 4),
                ("x_pad_1", 4),
            ],
        ),
        "gemm": (
            head + loop,
            [("dst_factor_out", acc), ("dst_factor_in", acc), ("src_factor_out", inp), ("src_factor_in", inp)]
            + [("wgt_factor_out", wgt), ("wgt_factor_in", wgt)],
        ),
        "alu": (
            head + loop,
            [("dst_factor_out", acc), ("dst_factor_in", acc), ("src_factor_out", acc), ("src_factor_in", acc)]
            + [("alu_opcode", 3), ("use_imm", 1), ("imm", IMM_BITS)],
        ),
        "finish": (head, []),
    }


def _pack(values: dict, layout: list, what: str) -> int:
    word, at = 0, 0
    for name, width in layout:
        value = int(values.get(name, 0))
        if name == "imm":  # the only signed field: two's complement in its width
            if not -(1 << (width - 1)) <= value < 1 << (width - 1):
                raise UsageError(f"{what}: immediate {value} does not fit {width} signed bits")
            value &= (1 << width) - 1
        elif not 0 <= value < 1 << width:
            raise UsageError(f"{what}: {name}={value} does not fit its {width}-bit field")
        word |= value << at
        at += width
    if at > 64:
        raise InternalError(f"{what}: layout of {at} bits in a 64-bit word")
    return word


def _unpack(word: int, layout: list) -> dict:
    out, at = {}, 0
    for name, width in layout:
        value = (word >> at) & ((1 << width) - 1)
        if name == "imm" and value >> (width - 1):
            value -= 1 << width
        out[name] = value
        at += width
    return out


def _values(insn: Insn) -> tuple[str, dict]:
    values = {f.name: getattr(insn, f.name) for f in fields(insn) if f.name != "deps"}
    values.update(vars(insn.deps))
    if isinstance(insn, MemInsn):
        return "mem", values
    if isinstance(insn, GemmInsn):
        return "gemm", {**values, "opcode": GEMM}
    if isinstance(insn, AluInsn):
        return "alu", {**values, "opcode": ALU}
    return "finish", {**values, "opcode": FINISH}


def encode(insns: list[Insn], config: VTAConfig) -> bytes:
    """The instruction stream as VTA fetches it: 16 bytes each, two little-endian 64-bit words."""
    layouts = _layouts(config)
    out = bytearray()
    for i, insn in enumerate(insns):
        kind, values = _values(insn)
        lo, hi = layouts[kind]
        what = f"instruction {i} ({OPCODES[values['opcode']]})"
        out += _pack(values, lo, what).to_bytes(8, "little") + _pack(values, hi, what).to_bytes(8, "little")
    return bytes(out)


def decode(data: bytes, config: VTAConfig) -> list[Insn]:
    """The instructions of a stream; an unknown opcode or a ragged length is exit 2."""
    if len(data) % INSN_BYTES:
        raise UsageError(
            f"instruction stream of {len(data)} bytes is not a whole number of {INSN_BYTES}-byte instructions"
        )
    layouts = _layouts(config)
    insns: list[Insn] = []
    for at in range(0, len(data), INSN_BYTES):
        lo = int.from_bytes(data[at : at + 8], "little")
        hi = int.from_bytes(data[at + 8 : at + 16], "little")
        opcode = lo & 7
        kind = {LOAD: "mem", STORE: "mem", GEMM: "gemm", ALU: "alu", FINISH: "finish"}.get(opcode)
        if kind is None:
            raise UsageError(f"instruction {at // INSN_BYTES}: unknown opcode {opcode}")
        values = {**_unpack(lo, layouts[kind][0]), **_unpack(hi, layouts[kind][1])}
        deps = Deps(*(bool(values.pop(k)) for k in ("pop_prev", "pop_next", "push_prev", "push_next")))
        values.pop("opcode")
        if kind == "mem":
            insns.append(MemInsn(opcode=opcode, deps=deps, **values))
        elif kind == "gemm":
            insns.append(GemmInsn(deps=deps, **{**values, "reset": bool(values["reset"])}))
        elif kind == "alu":
            values.update(reset=bool(values["reset"]), use_imm=bool(values["use_imm"]))
            insns.append(AluInsn(deps=deps, **values))
        else:
            insns.append(FinishInsn(deps=deps))
    return insns


def _uop_widths(config: VTAConfig) -> tuple[int, int, int]:
    # the micro-op's src field has the accumulator's width (it also indexes acc for ALU)
    return config.log_depth("acc"), config.log_depth("acc"), config.log_depth("wgt")


def encode_uops(uops: list[Uop], config: VTAConfig) -> bytes:
    dw, sw, ww = _uop_widths(config)
    arr = np.array([(u.dst, u.src, u.wgt) for u in uops], dtype=np.int64).reshape(-1, 3)
    for col, (name, width) in enumerate((("dst", dw), ("src", sw), ("wgt", ww))):
        if arr.size and (arr[:, col].min() < 0 or arr[:, col].max() >= 1 << width):
            raise UsageError(f"micro-op {name} index {arr[:, col].max()} does not fit its {width}-bit field")
    words = arr[:, 0] | (arr[:, 1] << dw) | (arr[:, 2] << (dw + sw))
    return words.astype("<u4").tobytes()


def decode_uops(data: bytes, config: VTAConfig) -> np.ndarray:
    """Micro-ops as an int64 array of (dst, src, wgt) rows."""
    if len(data) % 4:
        raise UsageError(f"micro-op image of {len(data)} bytes is not a whole number of 32-bit micro-ops")
    dw, sw, ww = _uop_widths(config)
    words = np.frombuffer(data, dtype="<u4").astype(np.int64)
    return np.stack(
        [words & ((1 << dw) - 1), (words >> dw) & ((1 << sw) - 1), (words >> (dw + sw)) & ((1 << ww) - 1)], 1
    )


def name(insn: Insn) -> str:
    """LOAD, STORE, GEMM, ALU or FINISH."""
    if isinstance(insn, MemInsn):
        return OPCODES[insn.opcode]
    return "GEMM" if isinstance(insn, GemmInsn) else "ALU" if isinstance(insn, AluInsn) else "FINISH"


def describe(insn: Insn) -> str:
    """One line of disassembly (for reports and debugging)."""
    d = insn.deps
    flags = "".join(c for c, on in zip(("<", "^", ">", "v"), (d.pop_prev, d.pop_next, d.push_prev, d.push_next)) if on)
    if isinstance(insn, MemInsn):
        return (
            f"{OPCODES[insn.opcode]} {MEMORIES.get(insn.memory_type, insn.memory_type)} sram={insn.sram_base} "
            f"dram={insn.dram_base} {insn.y_size}x{insn.x_size}/{insn.x_stride} "
            f"pad=({insn.y_pad_0},{insn.y_pad_1},{insn.x_pad_0},{insn.x_pad_1}) {flags}"
        )
    if isinstance(insn, FinishInsn):
        return f"FINISH {flags}"
    name = "GEMM" if isinstance(insn, GemmInsn) else f"ALU.{ALU_OPS.get(insn.alu_opcode, insn.alu_opcode)}"
    return f"{name} uop[{insn.uop_bgn}:{insn.uop_end}] x{insn.iter_out}x{insn.iter_in} reset={int(insn.reset)} {flags}"
