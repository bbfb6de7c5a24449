"""The VTA path: ISA bits, the simulator's semantics, lowering against the int32 reference, the target."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from accelc.errors import UsageError
from accelc.runtime import vta_isa as isa
from accelc.runtime import vta_sim
from accelc.runtime.cnn_fabric import pack, unpack
from accelc.runtime.cnn_int8 import run_step
from accelc.runtime.vta_config import DEFAULT, PYNQ, VTAConfig
from accelc.targets.vta_lower import Shape, lower_layer

NO = isa.Deps()


def test_pynq_configuration_derives_the_published_sizes():
    assert DEFAULT.tag == "1x16_i8w8a32_15_15_18_17"
    assert {n: DEFAULT.depth(n) for n in ("uop", "inp", "wgt", "acc", "out")} == {
        "uop": 8192, "inp": 2048, "wgt": 1024, "acc": 2048, "out": 2048,
    }  # fmt: skip
    assert (DEFAULT.elem_bytes("inp"), DEFAULT.elem_bytes("wgt"), DEFAULT.elem_bytes("acc")) == (16, 256, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"LOG_BLOCK": "4"}, "LOG_BLOCK must be an integer"),
        ({"TARGET": "vu9p"}, "TARGET is 'vu9p'"),
        ({"LOG_BATCH_SIZE": 0}, "unknown key"),
        ({"LOG_ACC_WIDTH": 4}, "i8w8a32"),
        ({"LOG_ACC_BUFF_SIZE": 22}, "too wide"),
    ],
)
def test_malformed_vta_config_is_a_usage_error(tmp_path, change, message):
    path = tmp_path / "vta_config.json"
    path.write_text(json.dumps({**PYNQ, **change}))
    with pytest.raises(UsageError, match=message):
        VTAConfig.read(path)
    path.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        VTAConfig.read(path)


def _random_insns(rng) -> list:
    def deps():
        return isa.Deps(*(bool(b) for b in rng.integers(0, 2, 4)))

    def loop():
        return dict(
            uop_bgn=int(rng.integers(0, 8192)), uop_end=int(rng.integers(0, 16384)),
            iter_out=int(rng.integers(0, 16384)), iter_in=int(rng.integers(0, 16384)),
            dst_factor_out=int(rng.integers(0, 2048)), dst_factor_in=int(rng.integers(0, 2048)),
            src_factor_out=int(rng.integers(0, 2048)), src_factor_in=int(rng.integers(0, 2048)),
        )  # fmt: skip

    out = []
    for _ in range(50):
        out.append(
            isa.MemInsn(
                int(rng.integers(0, 2)),
                deps(),
                int(rng.integers(0, 5)),
                int(rng.integers(0, 1 << 16)),
                int(rng.integers(0, 1 << 32)),
                *(int(v) for v in rng.integers(0, 1 << 16, 3)),
                *(int(v) for v in rng.integers(0, 16, 4)),
            )
        )
        out.append(
            isa.GemmInsn(
                deps(),
                bool(rng.integers(0, 2)),
                **loop(),
                wgt_factor_out=int(rng.integers(0, 1024)),
                wgt_factor_in=int(rng.integers(0, 1024)),
            )
        )
        out.append(
            isa.AluInsn(
                deps(),
                bool(rng.integers(0, 2)),
                **loop(),
                alu_opcode=int(rng.integers(0, 4)),
                use_imm=bool(rng.integers(0, 2)),
                imm=int(rng.integers(-(1 << 15), 1 << 15)),
            )
        )
        out.append(isa.FinishInsn(deps()))
    return out


def test_instructions_round_trip_through_their_bits():
    insns = _random_insns(np.random.default_rng(0))
    data = isa.encode(insns, DEFAULT)
    assert len(data) == 16 * len(insns)
    assert isa.decode(data, DEFAULT) == insns
    uops = [
        isa.Uop(int(d), int(s), int(w)) for d, s, w in np.random.default_rng(1).integers(0, [2048, 2048, 1024], (99, 3))
    ]
    decoded = isa.decode_uops(isa.encode_uops(uops, DEFAULT), DEFAULT)
    assert [isa.Uop(*map(int, row)) for row in decoded] == uops


def test_fields_sit_at_the_published_bit_positions():
    # LOAD: opcode 0..2, deps 3..6, memory_type 7..9, sram_base 10..25, dram_base 26..57; the
    # second word starts with y_size (a field never straddles the two 64-bit words)
    load = isa.MemInsn(isa.LOAD, isa.Deps(push_next=True), isa.MEM_INP, 5, 7, 3, 4, 9, 1, 2, 3, 4)
    lo, hi = (int.from_bytes(isa.encode([load], DEFAULT)[i : i + 8], "little") for i in (0, 8))
    assert lo == (1 << 6) | (isa.MEM_INP << 7) | (5 << 10) | (7 << 26)
    assert hi == 3 | (4 << 16) | (9 << 32) | (1 << 48) | (2 << 52) | (3 << 56) | (4 << 60)
    # GEMM: reset at 7, uop_bgn 8..20, uop_end 21..34, iter_out 35..48, iter_in 49..62; then the
    # factors dst 11+11, src 11+11, wgt 10+10 fill the second word
    gemm = isa.GemmInsn(NO, True, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    lo, hi = (int.from_bytes(isa.encode([gemm], DEFAULT)[i : i + 8], "little") for i in (0, 8))
    assert lo == isa.GEMM | (1 << 7) | (1 << 8) | (2 << 21) | (3 << 35) | (4 << 49)
    assert hi == 5 | (6 << 11) | (7 << 22) | (8 << 33) | (9 << 44) | (10 << 54)
    # ALU: a negative immediate is two's complement in the top 16 bits
    alu = isa.AluInsn(NO, False, 0, 1, 1, 1, 0, 0, 0, 0, isa.ALU_SHR, True, -2)
    hi = int.from_bytes(isa.encode([alu], DEFAULT)[8:], "little")
    assert hi >> 44 == isa.ALU_SHR | (1 << 3) | (0xFFFE << 4)
    # micro-op: dst 0..10, src 11..21, wgt 22..31
    assert isa.encode_uops([isa.Uop(3, 5, 7)], DEFAULT) == (3 | (5 << 11) | (7 << 22)).to_bytes(4, "little")


def test_values_that_do_not_fit_are_refused_not_truncated():
    with pytest.raises(UsageError, match="iter_out=16384 does not fit"):
        isa.encode([isa.GemmInsn(NO, False, 0, 1, 16384, 1, 0, 0, 0, 0, 0, 0)], DEFAULT)
    with pytest.raises(UsageError, match="immediate 40000"):
        isa.encode([isa.AluInsn(NO, False, 0, 1, 1, 1, 0, 0, 0, 0, isa.ALU_ADD, True, 40000)], DEFAULT)
    with pytest.raises(UsageError, match="not a whole number"):
        isa.decode(b"\0" * 17, DEFAULT)


def _alu_stream(ops: list[tuple[int, int]], values: np.ndarray) -> np.ndarray:
    """LOAD one accumulator element, apply ALU ops with immediates, STORE: what DRAM receives."""
    program = [
        isa.MemInsn(isa.LOAD, NO, isa.MEM_UOP, 0, 0, 1, 1, 1),
        isa.MemInsn(isa.LOAD, NO, isa.MEM_ACC, 0, 0, 1, 1, 1),
    ]
    program += [isa.AluInsn(NO, False, 0, 1, 1, 1, 0, 0, 0, 0, op, True, imm) for op, imm in ops]
    program[-1] = replace(program[-1], deps=isa.Deps(push_next=True))
    program += [isa.MemInsn(isa.STORE, isa.Deps(pop_prev=True, push_prev=True), isa.MEM_OUT, 0, 0, 1, 1, 1)]
    program += [isa.FinishInsn(isa.Deps(pop_next=True))]
    dram = vta_sim.Dram(
        uop=np.zeros((1, 3), np.int64),
        inp=np.zeros((1, 1, 1, 16), np.int8),
        wgt=np.zeros((1, 16, 16), np.int8),
        acc=values.astype(np.int32).reshape(1, 1, 16),
        out=np.zeros((1, 1, 1, 16), np.int8),
    )
    vta_sim.simulate(DEFAULT, isa.encode(program, DEFAULT), dram)
    return dram.out.reshape(16)


def test_alu_writes_truncate_to_the_low_eight_bits_and_shift_arithmetically():
    values = np.array([300, -200, 127, -128, 255, 256, -5, 1 << 20] + [0] * 8)
    # ADD 0 leaves the value: the output buffer gets its low 8 bits, not a saturated int8
    assert list(_alu_stream([(isa.ALU_ADD, 0)], values)[:8]) == [44, 56, 127, -128, -1, 0, -5, 0]
    # SHR is arithmetic (floor), then MIN/MAX clip before the store
    shifted = _alu_stream([(isa.ALU_SHR, 1), (isa.ALU_MAX, -128), (isa.ALU_MIN, 127)], values)
    assert list(shifted[:8]) == [127, -100, 63, -64, 127, 127, -3, 127]


def test_a_stream_whose_tokens_never_come_deadlocks():
    program = [
        isa.GemmInsn(isa.Deps(pop_prev=True), True, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0),
        isa.FinishInsn(NO),
    ]
    dram = vta_sim.Dram(np.zeros((1, 3), np.int64), np.zeros((1, 1, 1, 16), np.int8), np.zeros((1, 16, 16), np.int8),
                        np.zeros((1, 1, 16), np.int32), np.zeros((1, 1, 1, 16), np.int8))  # fmt: skip
    with pytest.raises(UsageError, match="deadlocks"):
        vta_sim.simulate(DEFAULT, isa.encode(program, DEFAULT), dram)


def _simulate(stream, x, config):
    """Run a lowered layer's binary stream on the simulator over inputs `x`: (DRAM output, stats)."""
    dram = vta_sim.Dram(
        uop=isa.decode_uops(stream.uops, config),
        inp=pack(x, config.block),
        wgt=stream.wgt,
        acc=stream.acc,
        out=np.zeros((len(x), stream.out_elems, 1, config.block), np.int8),
    )
    return dram.out, vta_sim.simulate(config, stream.insns, dram)


SMALL = VTAConfig.from_dict({**PYNQ, "LOG_INP_BUFF_SIZE": 11, "LOG_WGT_BUFF_SIZE": 13, "LOG_ACC_BUFF_SIZE": 13})


@pytest.mark.parametrize(
    "config, cin, cout, h, w, k, pad, low, pool",
    [
        (DEFAULT, 1, 32, 12, 12, 3, 1, 0, 1),  # first layer: one channel padded to a block
        (DEFAULT, 40, 20, 9, 7, 3, 0, -128, 1),  # ragged channels, no padding, no ReLU
        (DEFAULT, 300, 24, 1, 1, 1, 0, -128, 1),  # dense
        (SMALL, 48, 48, 10, 10, 3, 1, 0, 1),  # small buffers: row bands, channel chunks, many tiles
        (SMALL, 600, 40, 1, 1, 1, 0, 0, 1),  # dense with partial sums over input chunks
        (DEFAULT, 32, 32, 12, 12, 3, 1, 0, 2),  # ReLU and 2x2 max pooling fused on the ALU
        (SMALL, 20, 40, 12, 12, 3, 1, -128, 2),  # pooling signed values, over several bands
        (DEFAULT, 16, 16, 9, 9, 3, 0, 0, 7),  # one 7x7 window per block
    ],
)
def test_lowered_layers_are_bit_exact_against_the_int32_reference(config, cin, cout, h, w, k, pad, low, pool):
    rng = np.random.default_rng(cin * 1000 + cout)
    weight = rng.integers(-128, 128, (cout, cin, k, k)).astype(np.int8)
    bias = rng.integers(-20000, 20000, cout).astype(np.int32)
    x = rng.integers(-128, 128, (3, cin, h, w)).astype(np.int8)
    shift = 9 + pool // 2  # a wider window takes the maximum of more values: keep it off the clip
    shape = Shape(cin, cout, h, w, k, pad, pool)
    stream = lower_layer(weight, bias, shift, low, shape, config, "test layer")
    ho, wo = shape.stored_hw
    step = {"op": "conv2d", "layer": 0, "kernel": k, "padding": pad, "shift": shift, "low": low}
    want = run_step(step, {0: (weight, bias)}, x)
    if pool > 1:
        want = run_step({"op": "max_pool2d", "layer": 1, "kernel": pool}, {}, want)
    out, stats = _simulate(stream, x, config)
    assert np.array_equal(unpack(out, cout, ho, wo, flat=False), want)
    assert len(np.unique(want)) > 10  # the check saw real values, not a clipped constant
    assert stats.cycles > 0 and stats.instructions["GEMM"] >= 2
    if config is SMALL and pool == 1:  # the small buffers forced partial sums over input chunks, and row bands
        assert stream.tiling.chunk < -(-cin // 16) and (h == 1 or stream.tiling.rows < ho)
    if pool > 1:  # whole windows per band
        assert stream.tiling.rows % pool == 0 and stream.counts["ALU"] >= pool * pool


def test_a_layer_that_fits_no_tiling_is_refused():
    tiny = VTAConfig.from_dict({**PYNQ, "LOG_WGT_BUFF_SIZE": 10})  # 4 weight blocks: a 3x3 kernel needs 9
    weight = np.zeros((16, 16, 3, 3), np.int8)
    with pytest.raises(UsageError, match=r"conv 16->16.*fits no tiling"):
        lower_layer(weight, np.zeros(16, np.int32), 4, 0, Shape(16, 16, 8, 8, 3, 1), tiny, "conv 16->16")


def _one_block_dram(acc_value: int) -> vta_sim.Dram:
    return vta_sim.Dram(
        uop=np.zeros((1, 3), np.int64),
        inp=np.full((1, 1, 1, 16), 2, np.int8),
        wgt=np.full((1, 16, 16), 3, np.int8),
        acc=np.full((1, 1, 16), acc_value, np.int32),
        out=np.zeros((1, 1, 1, 16), np.int8),
    )


def test_a_reset_gemm_zeroes_the_accumulator_but_writes_acc_plus_product_to_the_output():
    # as the bitstream's HLS datapath does: out = low 8 bits of (acc + inp . wgt), acc = 0
    program = [
        isa.MemInsn(isa.LOAD, NO, isa.MEM_INP, 0, 0, 1, 1, 1),
        isa.MemInsn(isa.LOAD, isa.Deps(push_next=True), isa.MEM_WGT, 0, 0, 1, 1, 1),
        isa.MemInsn(isa.LOAD, NO, isa.MEM_UOP, 0, 0, 1, 1, 1),
        isa.MemInsn(isa.LOAD, NO, isa.MEM_ACC, 0, 0, 1, 1, 1),
        isa.GemmInsn(isa.Deps(pop_prev=True, push_next=True), True, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0),
        isa.MemInsn(isa.STORE, isa.Deps(pop_prev=True, push_prev=True), isa.MEM_OUT, 0, 0, 1, 1, 1),
        isa.FinishInsn(isa.Deps(pop_next=True)),
    ]
    dram = _one_block_dram(300)
    sim = vta_sim.Simulator(DEFAULT, 1)
    sim.run(isa.encode(program, DEFAULT), dram)
    assert list(dram.out.reshape(16)) == [(300 + 16 * 2 * 3 + 128) % 256 - 128] * 16
    assert not sim.acc[0, 0].any()


def test_a_stream_that_leaves_tokens_behind_is_refused():
    # the hardware asserts its token queues are empty at the end: a push nobody pops is a bug
    program = [
        isa.MemInsn(isa.LOAD, isa.Deps(push_next=True), isa.MEM_INP, 0, 0, 1, 1, 1),
        isa.FinishInsn(NO),
    ]
    with pytest.raises(UsageError, match="leaves dependency tokens behind"):
        vta_sim.simulate(DEFAULT, isa.encode(program, DEFAULT), _one_block_dram(0))


@pytest.mark.parametrize(
    "config, cin, cout, h, k, pad",
    [
        (SMALL, 600, 40, 1, 1, 0),  # dense, ragged outputs, partial sums over input chunks (an LM projection)
        (DEFAULT, 40, 20, 6, 3, 1),  # a convolution over rows
    ],
)
def test_a_shift_per_output_channel_is_an_alu_shr_by_a_vector(config, cin, cout, h, k, pad):
    rng = np.random.default_rng(cout)
    weight = rng.integers(-128, 128, (cout, cin, k, k)).astype(np.int8)
    shifts = rng.integers(6, 14, cout)
    bias = (1 << (shifts - 1)).astype(np.int32)  # each channel's rounding constant
    x = rng.integers(-128, 128, (3, cin, h, h)).astype(np.int8)
    shape = Shape(cin, cout, h, h, k, pad, channel_shifts=True)
    stream = lower_layer(weight, bias, shifts, -128, shape, config, "test layer")
    step = {"op": "conv2d", "layer": 0, "kernel": k, "padding": pad, "shift": shifts.tolist(), "low": -128}
    want = run_step(step, {0: (weight, bias)}, x)
    out, _ = _simulate(stream, x, config)
    ho, wo = shape.stored_hw
    assert np.array_equal(unpack(out, cout, ho, wo, flat=False), want)
    assert len(np.unique(want)) > 10
    with pytest.raises(UsageError, match="one shift per output channel"):
        lower_layer(weight, bias, shifts[:-1], -128, shape, config, "test layer")
