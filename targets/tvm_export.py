"""torch causal LM -> Relax IRModule: the step function TVM compiles, and its parameters.

    step(input_ids[1, k], past_0 .. past_{2L-1}, *params)
        -> (logits[1, k, V], present_0 .. present_{2L-1})

where past_{2i}/past_{2i+1} are layer i's keys/values, each [1, kv_heads, P, head_dim], and the
presents are the same tensors grown to P + k. Both k >= 1 and P >= 0 are dynamic, so one
function serves prefill (P = 0), single-token decode (k = 1) and k-token verification. The
position ids are P .. P+k-1, derived inside the graph from the past's length: a caller cannot
pass positions that disagree with the cache it passes. A second function, truncate_kv, slices
every past tensor to its first n positions.

Route: torch.export of a thin wrapper around the *unmodified* HF module (its own attention, RoPE,
masking and cache code), then TVM's `from_exported_program`. The wrapper seeds a DynamicCache
with the past tensors; that is the whole architecture-specific surface, which is why Llama, Qwen2,
GPT-2 and OPT all lower through the same code and match HF to float32 rounding. Parameters are
detached from the IR and deduplicated by storage (tied embeddings are one tensor).
"""

from __future__ import annotations

from typing import Any

from accelc.errors import UsageError
from accelc.runtime.tvm_backend import import_tvm

STEP_FUNC = "step"  # the Relax function the runtime calls for prefill / decode / verify
TRUNCATE_FUNC = "truncate_kv"  # slices every past tensor to its first n positions

# Families whose HF modules take a DynamicCache and explicit position ids, and which the tests
# check against HF. Others may lower too, but we refuse what we have not verified.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2", "opt")
SUPPORTED_DTYPE = "float32"

# The traced example: small enough to export fast, > 1 so torch.export cannot specialise k or P
# to the value 1 (it specialises sizes 0 and 1).
EXAMPLE_NEW_TOKENS = 3
EXAMPLE_PAST_LEN = 5


# --------------------------------------------------------------------------------------------
# An exportable step function around the HF module
# --------------------------------------------------------------------------------------------


def architecture_shapes(model) -> dict[str, int]:
    """Layer count, KV heads, head_dim and vocab of a supported causal LM (UsageError otherwise)."""
    config = model.config
    architecture = getattr(config, "model_type", None)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"TVM lowering supports the causal LM architectures {', '.join(SUPPORTED_ARCHITECTURES)}; got model_type={architecture!r}"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        # The wrapper builds a full-attention DynamicCache; sliding layers would need their own.
        raise UsageError(f"{architecture} with sliding-window attention is not supported by the TVM target")
    heads = config.num_attention_heads
    return {
        "family": architecture,  # the key tvm_meta.json has always had for the model_type
        "num_layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": model.get_output_embeddings().weight.shape[0],
    }


def _step_wrapper(model, num_layers: int):
    """A torch module with the flat step signature, delegating all maths to `model`."""
    import torch
    from transformers import DynamicCache

    class StepWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *past):
            # input_ids [1, k]; past[2i], past[2i+1]: [1, kv_heads, P, head_dim]
            cache = DynamicCache()
            for i in range(num_layers):
                # Seed each layer directly: DynamicLayer's lazy init concatenates onto a 1-D
                # empty tensor, which torch allows and TVM's concat rejects ("Concat expects all
                # input tensors to have same ndim"). update() on a zero-length slice initialises
                # the layer with the right dtype/device; then the past replaces its contents.
                cache.update(past[2 * i][:, :, :0], past[2 * i + 1][:, :, :0], i)
                cache.layers[i].keys, cache.layers[i].values = past[2 * i], past[2 * i + 1]
            past_len, new_len = past[0].shape[2], input_ids.shape[1]
            positions = torch.arange(past_len, past_len + new_len, device=input_ids.device)
            out = self.model(
                input_ids=input_ids,
                past_key_values=cache,
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                use_cache=True,
            )
            present = out.past_key_values
            flat = []
            for i in range(num_layers):
                flat += [present.layers[i].keys, present.layers[i].values]
            # logits [1, k, V]; presents [1, kv_heads, P + k, head_dim]
            return (out.logits, *flat)

    return StepWrapper()


def export_step(model, shapes: dict[str, int], max_seq_len: int):
    """torch.export the step wrapper with dynamic k (new tokens) and P (past length)."""
    import torch
    from torch.export import Dim, export

    num_layers, kv_heads, head_dim = shapes["num_layers"], shapes["kv_heads"], shapes["head_dim"]
    wrapper = _step_wrapper(model, num_layers)
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(1, EXAMPLE_NEW_TOKENS, dtype=torch.long)
    past = tuple(torch.zeros(1, kv_heads, EXAMPLE_PAST_LEN, head_dim, dtype=dtype) for _ in range(2 * num_layers))
    new_len = Dim("new_len", min=1, max=max_seq_len)
    past_len = Dim("past_len", min=0, max=max_seq_len)
    dynamic = ({1: new_len}, tuple({2: past_len} for _ in past))
    was_training = model.training
    try:
        with torch.no_grad():
            return export(wrapper.eval(), (ids, *past), dynamic_shapes=dynamic)
    finally:
        model.train(was_training)  # eval() above must not leak into the caller's model


# --------------------------------------------------------------------------------------------
# Relax module, parameters kept out of the IR
# --------------------------------------------------------------------------------------------


def _param_sources(exported) -> dict[str, str]:
    """Relax/FX placeholder name -> storage key, so tied weights map to one stored tensor."""
    sig = exported.graph_signature
    state = exported.state_dict
    by_storage: dict[int, str] = {}
    keys: dict[str, str] = {}
    for placeholder, fqn in sig.inputs_to_parameters.items():
        tensor = state[fqn]
        storage = tensor.untyped_storage().data_ptr()
        # Store under the HF state_dict name (drop the wrapper's "model." prefix).
        keys[placeholder] = by_storage.setdefault(storage, fqn.removeprefix("model."))
    return keys


def _truncate_function(num_tensors: int, kv_heads: int, head_dim: int, dtype: str):
    """truncate_kv(past_0 .. past_{n-1}, R.Shape([n])) -> tuple of past_i[:, :, :n, :].

    TVM tensors cannot be sliced along an inner axis from Python, so the runtime calls this
    compiled slice instead of copying the whole cache through numpy.
    """
    from tvm import relax, tirx

    past_len = tirx.Var("past_len", "int64")
    keep = tirx.Var("keep", "int64")
    bb = relax.BlockBuilder()
    tensors = [
        relax.Var(f"past_{i}", relax.TensorType([1, kv_heads, past_len, head_dim], dtype)) for i in range(num_tensors)
    ]
    new_len = relax.Var("new_len", relax.ShapeType([keep]))
    with bb.function(TRUNCATE_FUNC, [*tensors, new_len]):
        with bb.dataflow():
            sliced = [
                bb.emit(relax.op.strided_slice(t, axes=[2], begin=[0], end=[keep], assume_inbound=True))
                for t in tensors
            ]
            out = bb.emit_output(relax.Tuple(sliced))
        bb.emit_func_output(out)
    return bb.get()[TRUNCATE_FUNC]


def to_relax(exported, shapes: dict[str, int], dtype: str):
    """(IRModule with step + truncate_kv, input names, the stored-tensor name of each parameter
    slot in call order, {stored name: numpy array})."""
    tvm = import_tvm()
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(exported, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    step = mod["main"]
    num_inputs = int(step.attrs["num_input"])
    param_vars = step.params[num_inputs:]
    param_names = [v.name for v in param_vars]
    sources = _param_sources(exported)
    stored: dict[str, Any] = {}
    slots = []
    for name, value in zip(param_names, params["main"]):
        key = sources.get(name, name)
        slots.append(key)
        if key not in stored:
            stored[key] = value.numpy()
    trunc = _truncate_function(2 * shapes["num_layers"], shapes["kv_heads"], shapes["head_dim"], dtype)
    out = tvm.IRModule(
        {
            STEP_FUNC: step.with_attr("global_symbol", STEP_FUNC),
            TRUNCATE_FUNC: trunc.with_attr("global_symbol", TRUNCATE_FUNC),
        }
    )
    input_names = [v.name for v in step.params[:num_inputs]]
    return out, input_names, slots, stored
