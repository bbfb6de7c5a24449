"""A latency budget: per-layer decode cost measured on the target once, then looked up.

A subnet's latency is a function of its shape (masks.py), and on a CPU a decoder layer's decode
step is the sum of its parts: the attention block (q/k/v/o projections and attention over the
KV cache, per query-head count) and the MLP (gate/up/down, per width). So we time those two
blocks, each as a stack as deep as the model (so weights stream from memory, as in the real
step), as ONNX graphs on ONNX Runtime with the artifact's threading, over a grid of head counts
and MLP widths, and model

    latency(shape) = fixed + sum over layers (attention[n_q, n_kv] + mlp(width))

with mlp(width) interpolated linearly between measured grid widths and `fixed` the LM head (the
embedding gather and norms are not timed). Small GEMVs on a CPU are not linear in width (cache
and tile effects), which is why this is measured rather than derived from the parameter count.

The table is cached under ~/.cache/accelc/latency/ keyed by the geometry, the measurement
protocol, the ORT version and the CPU model, so it is measured once per machine type.

The blocks are built from the operators the deployed fused graph uses (fused_decoder.py), so
heads and channels are priced as that graph runs them. Known limit (docs/notes.md): the layer
norms, residual adds and embedding gather are not timed; they do not depend on the shape, so
rankings are unaffected, but a `latency_ratio` budget is judged against a dense cost that
leaves them out, i.e. slightly optimistically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from accelc import progress
from accelc.compiler.pruning.masks import DEFAULT_SLACK, Budget, Geometry, SearchSpace, Shape, check_feasible
from accelc.errors import UsageError

TABLE_FORMAT = 5  # 5: attention timed as the fused graph runs it (GroupQueryAttention)
GRID_POINTS = 12  # MLP widths measured between the smallest allowed width and the dense one


@dataclass(frozen=True)
class Protocol:
    tokens: int = 1  # tokens per step: 1 = decode
    past: int = 128  # KV-cache length the attention reads
    threads: int = 0  # ORT intra-op threads (0 = ORT's default: all cores)
    repeats: int = 20  # timed runs per graph (median)


@dataclass
class LatencyTable:
    """Milliseconds per step: attention per (query heads, KV heads), MLP per measured width."""

    attention: dict  # "n_q,n_kv" -> ms
    mlp_widths: list
    mlp_ms: list
    fixed_ms: float
    meta: dict

    def mlp(self, width: int) -> float:
        return float(np.interp(width, self.mlp_widths, self.mlp_ms))

    def cost(self, shape: Shape) -> float:
        try:
            return self.fixed_ms + sum(self.attention[f"{q},{kv}"] + self.mlp(w) for q, kv, w in shape)
        except KeyError as exc:
            raise UsageError(f"latency table has no entry for attention shape {exc}; re-measure it") from None

    def to_json(self) -> dict:
        return asdict(self)


class LatencyBudget(Budget):
    """At most `limit` ms per decode step (measured table), at least `floor` for candidates."""

    unit = "ms per decode step (measured)"

    def __init__(self, space: SearchSpace, table: LatencyTable, limit: float, floor: float | None = None):
        self.space, self.table = space, table
        self.limit = float(limit)
        self.floor = float(limit if floor is None else min(floor, limit))
        check_feasible(space, self)

    @classmethod
    def from_ratio(
        cls, space: SearchSpace, table: LatencyTable, ratio: float, slack: float = DEFAULT_SLACK
    ) -> LatencyBudget:
        """Decode latency at most `ratio` of the dense model's (0 < ratio < 1)."""
        if not 0.0 < ratio < 1.0:
            raise UsageError(
                f"latency ratio must be strictly between 0 and 1 (the fraction of the dense "
                f"model's decode latency to keep), got {ratio}"
            )
        dense = table.cost(space.dense_shape())
        return cls(space, table, ratio * dense, (ratio - slack) * dense)

    def cost(self, shape: Shape) -> float:
        return self.table.cost(shape)

    def describe(self) -> dict:
        dense = self.table.cost(self.space.dense_shape())
        return {**super().describe(), "dense_ms": dense, "ratio_at_limit": self.limit / dense, "table": self.table.meta}


# --------------------------------------------------------------------------- measurement


def _weights(rng, *shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


class _Stack:
    """A chain of `copies` blocks, each with its own weights: y_i = block_i(y_{i-1}).

    One block's weights (a few MB) would sit in the CPU cache between timed runs; the real
    decoder streams every layer's weights from memory each step, so the table times a stack as
    deep as the model and divides."""

    def __init__(self, copies: int):
        self.copies, self.nodes, self.inits, self.inputs, self.outputs, self.feed = copies, [], {}, [], [], {}

    def input(self, name, array):
        self.inputs.append((name, list(array.shape)))
        self.feed[name] = array

    def model(self) -> bytes:
        from onnx import TensorProto, helper, numpy_helper

        inputs = [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(self.feed[n].dtype), s)
            for n, s in self.inputs
        ]
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in self.outputs]
        graph = helper.make_graph(
            self.nodes, "stack", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in self.inits.items()]
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        ).SerializeToString()


def mlp_stack(hidden: int, width: int, tokens: int, copies: int, rng) -> _Stack:
    from onnx import helper

    st = _Stack(copies)
    st.input("x.0", _weights(rng, 1, tokens, hidden))
    for i in range(copies):
        x, y = f"x.{i}", f"x.{i + 1}"
        st.nodes += [
            helper.make_node("MatMul", [x, f"wg.{i}"], [f"g.{i}"]),
            helper.make_node("Sigmoid", [f"g.{i}"], [f"sg.{i}"]),
            helper.make_node("Mul", [f"g.{i}", f"sg.{i}"], [f"a.{i}"]),
            helper.make_node("MatMul", [x, f"wu.{i}"], [f"u.{i}"]),
            helper.make_node("Mul", [f"a.{i}", f"u.{i}"], [f"h.{i}"]),
            helper.make_node("MatMul", [f"h.{i}", f"wd.{i}"], [y]),
        ]
        st.inits.update(
            {
                f"wg.{i}": _weights(rng, hidden, width),
                f"wu.{i}": _weights(rng, hidden, width),
                f"wd.{i}": _weights(rng, width, hidden),
            }
        )
    st.outputs.append((f"x.{copies}", [1, tokens, hidden]))
    return st


def attention_stack(geo: Geometry, n_q: int, n_kv: int, tokens: int, past: int, copies: int, rng) -> _Stack:
    """One step of attention as the deployed (fused) decoder runs it, see fused_decoder.py: the
    packed q|k|v projection, GroupQueryAttention (rotary, appending to an n_kv-head cache of
    `past` positions, GQA, softmax) and the o projection. The present K/V are outputs, as they
    are in the deployed graph."""
    from onnx import helper

    d, h, n = geo.head_dim, geo.hidden, past + tokens
    st = _Stack(copies)
    st.input("x.0", _weights(rng, 1, tokens, h))
    st.input("seqlens_k", np.array([n - 1], dtype=np.int32))
    st.input("total_sequence_length", np.array(n, dtype=np.int32))
    angles = np.outer(np.arange(n), 1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32)
    st.inits.update({"cos_cache": np.cos(angles), "sin_cache": np.sin(angles)})
    for i in range(copies):
        x, y = f"x.{i}", f"x.{i + 1}"
        st.input(f"past_k.{i}", _weights(rng, 1, n_kv, past, d))
        st.input(f"past_v.{i}", _weights(rng, 1, n_kv, past, d))
        st.nodes += [
            helper.make_node("MatMul", [x, f"wqkv.{i}"], [f"qkv.{i}"]),
            helper.make_node(
                "GroupQueryAttention",
                [
                    f"qkv.{i}",
                    "",
                    "",
                    f"past_k.{i}",
                    f"past_v.{i}",
                    "seqlens_k",
                    "total_sequence_length",
                    "cos_cache",
                    "sin_cache",
                ],
                [f"c.{i}", f"present_k.{i}", f"present_v.{i}"],
                domain="com.microsoft",
                num_heads=n_q,
                kv_num_heads=n_kv,
                scale=float(d**-0.5),
                do_rotary=1,
                rotary_interleaved=0,
                local_window_size=-1,
            ),
            helper.make_node("MatMul", [f"c.{i}", f"wo.{i}"], [y]),
        ]
        st.inits.update({f"wqkv.{i}": _weights(rng, h, (n_q + 2 * n_kv) * d), f"wo.{i}": _weights(rng, n_q * d, h)})
        st.outputs += [(f"present_k.{i}", [1, n_kv, n, d]), (f"present_v.{i}", [1, n_kv, n, d])]
    st.outputs.append((f"x.{copies}", [1, tokens, h]))
    return st


def head_stack(hidden: int, vocab: int, tokens: int, rng) -> _Stack:
    from onnx import helper

    st = _Stack(1)
    st.input("x.0", _weights(rng, 1, tokens, hidden))
    st.nodes.append(helper.make_node("MatMul", ["x.0", "w"], ["y"]))
    st.inits["w"] = _weights(rng, hidden, vocab)
    st.outputs.append(("y", [1, tokens, vocab]))
    return st


def time_stack(stack: _Stack, protocol: Protocol) -> float:
    """Median milliseconds of one block: an ORT run of the stack over its depth (spinning off,
    as the artifact runs)."""
    import onnxruntime as ort

    from accelc.runtime.ort_backend import session_options

    feed = stack.feed
    sess = ort.InferenceSession(
        stack.model(),
        sess_options=session_options({"intra_op_threads": protocol.threads}),
        providers=["CPUExecutionProvider"],
    )
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(protocol.repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) / stack.copies


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(geo: Geometry, space: SearchSpace, vocab: int, protocol: Protocol) -> dict:
    import onnxruntime as ort

    return {
        "format": TABLE_FORMAT,
        "geometry": {k: v for k, v in asdict(geo).items() if k != "biased"},
        "vocab": vocab,
        "gqa": space.gqa,
        "multiple": space.multiple,
        "grid": GRID_POINTS,
        "protocol": asdict(protocol),
        "onnxruntime": ort.__version__,
        "cpu": _cpu_name(),
    }


def measure(
    geo: Geometry, space: SearchSpace, vocab: int, protocol: Protocol = Protocol(), cache_dir: Path | None = None
) -> LatencyTable:
    """The table for this geometry on this machine: from the cache, or measured (and cached)."""
    key = table_key(geo, space, vocab, protocol)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if cache_dir is None:
        from accelc import assets

        cache_dir = assets.cache_root() / "latency"
    path = Path(cache_dir) / f"{digest}.json"
    if path.exists():
        data = json.loads(path.read_text())
        return LatencyTable(**data)
    rng = np.random.default_rng(0)
    shapes = sorted({space.option_shape(o, 0)[:2] for o in range(len(space.head_options))})
    lo, hi = space.widths[0], geo.intermediate
    widths = sorted({space.snap_width(w) for w in np.linspace(lo, hi, GRID_POINTS)} | {lo, hi})
    bar = progress.bar(total=len(shapes) + len(widths) + 1, desc="latency table (ORT)", unit="graph")
    attention_ms = []
    for n_q, n_kv in shapes:  # sorted: more query heads (and never fewer KV heads) come later
        attention_ms.append(
            time_stack(attention_stack(geo, n_q, n_kv, protocol.tokens, protocol.past, geo.num_layers, rng), protocol)
        )
        bar.update()
    attention = {f"{n_q},{n_kv}": float(ms) for (n_q, n_kv), ms in zip(shapes, np.maximum.accumulate(attention_ms))}
    mlp_ms = []
    for w in widths:
        mlp_ms.append(time_stack(mlp_stack(geo.hidden, w, protocol.tokens, geo.num_layers, rng), protocol))
        bar.update()
    # timing noise must not make a wider block look cheaper: the table is monotone by construction
    mlp_ms = list(np.maximum.accumulate(mlp_ms))
    fixed = time_stack(head_stack(geo.hidden, vocab, protocol.tokens, rng), protocol)
    bar.update()
    bar.close()
    table = LatencyTable(
        attention,
        [int(w) for w in widths],
        [float(x) for x in mlp_ms],
        float(fixed),
        {**key, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(table.to_json(), indent=1))
    tmp.replace(path)  # atomic: a concurrent measurement publishes an equivalent table
    return table
