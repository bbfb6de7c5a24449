"""A VTA hardware configuration (`vta_config.json`) and the sizes derived from it.

The keys are those of VTA's own configuration file (Moreau et al., "A Hardware-Software
Blueprint for Flexible Deep Learning Specialization", arXiv 1807.04188, section 3): log2 of the
operand widths, of the GEMM core's BATCH and BLOCK, and of the four on-chip buffers in bytes.
The default is the PYNQ-Z1 bitstream's `1x16_i8w8a32_15_15_18_17`. A compiled stream is valid
only for a bitstream whose tag equals its configuration's, so the artifact carries the file.
Field widths of instructions and micro-ops follow from the buffer depths (docs/fpga.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from accelc.errors import UsageError

# target -> (clock in MHz, log2 of the AXI bus width in bits): the board shells of VTA's release
BOARDS = {"sim": (100, 6), "pynq": (100, 6), "ultra96": (333, 7), "zcu104": (333, 7), "de10nano": (100, 6)}
LOG_KEYS = (
    "LOG_INP_WIDTH",
    "LOG_WGT_WIDTH",
    "LOG_ACC_WIDTH",
    "LOG_BATCH",
    "LOG_BLOCK",
    "LOG_UOP_BUFF_SIZE",
    "LOG_INP_BUFF_SIZE",
    "LOG_WGT_BUFF_SIZE",
    "LOG_ACC_BUFF_SIZE",
)
PYNQ = {
    "TARGET": "pynq",
    "HW_VER": "0.0.2",
    "LOG_INP_WIDTH": 3,
    "LOG_WGT_WIDTH": 3,
    "LOG_ACC_WIDTH": 5,
    "LOG_BATCH": 0,
    "LOG_BLOCK": 4,
    "LOG_UOP_BUFF_SIZE": 15,
    "LOG_INP_BUFF_SIZE": 15,
    "LOG_WGT_BUFF_SIZE": 18,
    "LOG_ACC_BUFF_SIZE": 17,
}
UOP_BITS = 32
INSN_BYTES = 16


@dataclass(frozen=True)
class VTAConfig:
    TARGET: str
    HW_VER: str
    LOG_INP_WIDTH: int
    LOG_WGT_WIDTH: int
    LOG_ACC_WIDTH: int
    LOG_BATCH: int
    LOG_BLOCK: int
    LOG_UOP_BUFF_SIZE: int
    LOG_INP_BUFF_SIZE: int
    LOG_WGT_BUFF_SIZE: int
    LOG_ACC_BUFF_SIZE: int

    @classmethod
    def from_dict(cls, data, where: str = "vta_config.json") -> VTAConfig:
        """Validate (exit 2, naming the key and what is allowed)."""
        if not isinstance(data, dict):
            raise UsageError(f"{where}: expected a JSON object of VTA configuration keys")
        unknown = sorted(set(data) - set(PYNQ))
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(PYNQ)}")
        missing = [k for k in PYNQ if k not in data]
        if missing:
            raise UsageError(f"{where}: missing key(s) {', '.join(missing)}")
        if data["TARGET"] not in BOARDS:
            raise UsageError(f"{where}: TARGET is {data['TARGET']!r}; allowed: {', '.join(BOARDS)}")
        if not isinstance(data["HW_VER"], str):
            raise UsageError(f'{where}: HW_VER must be a version string such as "0.0.2"')
        for key in LOG_KEYS:
            if not isinstance(data[key], int) or isinstance(data[key], bool) or not 0 <= data[key] <= 24:
                raise UsageError(f"{where}: {key} must be an integer from 0 to 24, not {data[key]!r}")
        config = cls(**data)
        # what this simulator and encoder implement: int8 operands, int32 accumulators, and
        # buffers deep enough that one element of each fits and the micro-op fields fit 32 bits
        if (config.LOG_INP_WIDTH, config.LOG_WGT_WIDTH, config.LOG_ACC_WIDTH) != (3, 3, 5):
            raise UsageError(f"{where}: only LOG_INP_WIDTH=3, LOG_WGT_WIDTH=3, LOG_ACC_WIDTH=5 (i8w8a32) are supported")
        for name in ("uop", "inp", "wgt", "acc"):
            if config.log_depth(name) < 1:
                raise UsageError(f"{where}: LOG_{name.upper()}_BUFF_SIZE is too small to hold one element")
        acc, inp, wgt, uop = (config.log_depth(n) for n in ("acc", "inp", "wgt", "uop"))
        # the fixed 128-bit instruction words (docs/fpga.md): each 64-bit half must hold its fields
        fits = {
            "a 32-bit micro-op (dst, src, wgt indices)": 2 * acc + wgt <= UOP_BITS and inp <= acc,
            "the GEMM/ALU first word (micro-op range)": 3 + 4 + 1 + uop + (uop + 1) + 2 * 14 <= 64,
            "the GEMM second word (index factors)": 2 * acc + 2 * inp + 2 * wgt <= 64,
            "the ALU second word (index factors, opcode, immediate)": 4 * acc + 3 + 1 + 16 <= 64,
        }
        for what, ok in fits.items():
            if not ok:
                raise UsageError(f"{where}: the buffer sizes give indices too wide for {what}")
        return config

    @classmethod
    def read(cls, path: Path) -> VTAConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: cannot read the VTA configuration ({exc})") from None
        return cls.from_dict(data, str(path))

    def to_json(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ derived sizes
    @property
    def batch(self) -> int:
        return 1 << self.LOG_BATCH

    @property
    def block(self) -> int:
        return 1 << self.LOG_BLOCK

    def elem_bytes(self, name: str) -> int:
        """Bytes of one element of a buffer: an instruction's sizes and addresses count elements."""
        return {
            "uop": UOP_BITS // 8,
            "inp": self.batch * self.block,
            "wgt": self.block * self.block,
            "acc": self.batch * self.block * 4,
            "out": self.batch * self.block,
        }[name]

    def log_depth(self, name: str) -> int:
        log_size = {
            "uop": self.LOG_UOP_BUFF_SIZE,
            "inp": self.LOG_INP_BUFF_SIZE,
            "wgt": self.LOG_WGT_BUFF_SIZE,
            "acc": self.LOG_ACC_BUFF_SIZE,
            # the output buffer has the accumulator's depth with int8 elements
            "out": self.LOG_ACC_BUFF_SIZE,
        }[name]
        elem = {"out": self.elem_bytes("acc")}.get(name, self.elem_bytes(name))
        return log_size - (elem.bit_length() - 1)

    def depth(self, name: str) -> int:
        return 1 << self.log_depth(name)

    @property
    def tag(self) -> str:
        """The bitstream tag, `{BATCH}x{BLOCK}_i{INP}w{WGT}a{ACC}_{uop}_{inp}_{wgt}_{acc}`."""
        return (
            f"{self.batch}x{self.block}_i{1 << self.LOG_INP_WIDTH}w{1 << self.LOG_WGT_WIDTH}"
            f"a{1 << self.LOG_ACC_WIDTH}_{self.LOG_UOP_BUFF_SIZE}_{self.LOG_INP_BUFF_SIZE}"
            f"_{self.LOG_WGT_BUFF_SIZE}_{self.LOG_ACC_BUFF_SIZE}"
        )

    @property
    def clock_mhz(self) -> int:
        return BOARDS[self.TARGET][0]

    @property
    def bus_bytes(self) -> int:
        return (1 << BOARDS[self.TARGET][1]) // 8


DEFAULT = VTAConfig.from_dict(PYNQ, "the PYNQ default")
