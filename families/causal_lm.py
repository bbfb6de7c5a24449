"""The causal-LM family: turn a recipe's `model:` section into a Bundle, load torch models.

Every input is normalised to a Hugging Face checkpoint folder (config + safetensors +
tokenizer): a user's folder as is, a GGUF file converted once and cached, a built-in tiny model
materialised once from its seeded config, the embedded SmolLM2 fetched once. Everything else
downstream reads that folder. Its artifacts serve the StepModel protocol on torch, ONNX Runtime
and TVM, and are proved by families/causal_lm_proof.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelc import progress
from accelc.compiler.bundle import Bundle
from accelc.errors import UsageError
from accelc.families.base import Family, register_family
from accelc.fileutil import sha256_file
from accelc.runtime.base import StepModel
from accelc.runtime.limits import CONTEXT_KEYS

EMBEDDED = "smollm2-135m-instruct"
# Architectures (Hugging Face model_type) whose export, lowering and validation are exercised by
# the test suite.
SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "opt", "qwen2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def builtin_names() -> list[str]:
    from accelc.families.tiny import TINY_CONFIGS

    return [EMBEDDED, *TINY_CONFIGS]


def _builtin_dir(name: str) -> Path:
    from accelc import assets
    from accelc.families import tiny

    if name == EMBEDDED:
        return assets.smollm2_dir()
    if name not in tiny.TINY_CONFIGS:
        raise UsageError(f"unknown builtin model '{name}'; allowed: {', '.join(builtin_names())}")
    final = assets.cache_root() / "models" / f"{name}-seed{tiny.SEED}"
    if (final / "config.json").exists():
        return final
    # same seed, same weights: if another process publishes first, its copy is kept
    return assets.publish_dir(tiny.build(name, assets.temp_sibling_dir(final)), final)


def check_config(directory: Path, trust_remote_code: bool = False) -> dict:
    """Refuse a folder whose config.json is not a model config transformers can read: without
    this a JSON list or a stray settings file failed later inside an exporter (exit 1)."""
    from transformers import AutoConfig

    path = directory / "config.json"
    if not path.exists():
        raise UsageError(f"{directory}: not a Hugging Face checkpoint folder (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, and bytes that are not UTF-8
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UsageError(
            f'{path} is not a model config (no "model_type"); point model.path at a folder written by save_pretrained'
        )
    weights = [p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if weights:  # before transformers reads the sizes: a damaged one can make it allocate for ever
        check_config_sizes(directory, config, weights)
    try:
        AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError for bad configs
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0]  # its first sentence
        raise UsageError(f"{path}: transformers cannot read this model config ({reason})") from None
    for key in CONTEXT_KEYS:
        if key in config and not (isinstance(config[key], int) and config[key] >= 1):
            raise UsageError(f"{path}: {key} is {config[key]!r}; a context length is a positive whole number")
    return config


def check_checkpoint(directory: Path, trust_remote_code: bool = False) -> None:
    """Fail early with one clear line on folders that are not loadable checkpoints."""
    model_type = check_config(directory, trust_remote_code)["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        progress.status(
            f"warning: model_type '{model_type}' is not among the tested architectures "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}); export may fail"
        )
    weights = [p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise UsageError(f"{directory}: no weight files (*.safetensors) in the checkpoint folder")
    for path in weights:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
                    if names:  # the header can be intact while the data is cut short
                        f.get_slice(names[-1])[...]
            except Exception as exc:  # safetensors raises its own error types for bad files
                raise UsageError(f"{path}: not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    check_shapes(directory, trust_remote_code)


def check_shapes(directory: Path, trust_remote_code: bool = False) -> None:
    """Refuse weights whose shapes are not the ones config.json describes (a damaged or foreign
    config): the model the config builds, on the meta device (no memory), against the tensor
    shapes in the safetensors headers. Without this, a wrong hidden_size surfaces as a size
    mismatch inside export_onnx (exit 4) instead of at ingest."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelc.compiler.pruning import materialize

    if materialize.is_pruned(directory):  # per-layer widths: its own loader checks them
        return
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # an architecture this transformers cannot build: loading will say more
        progress.status(f"warning: {directory}: shapes not checked ({type(exc).__name__})")
        return
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = tuple(f.get_slice(name).get_shape())
                if name in expected and expected[name] != shape:
                    raise UsageError(
                        f"{path}: {name} has shape {list(shape)} but {directory / 'config.json'} describes "
                        f"{list(expected[name])}; the config does not belong to these weights"
                    )


# config.json entries that size the model: transformers allocates by them before it reads a weight,
# so a damaged value (10**40 layers, a vocabulary of 10**12) hangs or exhausts memory
SIZE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "intermediate_size",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "ffn_dim",
)
MAX_POSITIONS = 2**24  # far beyond any released model's context; a bigger one is a damaged file


def check_config_sizes(directory: Path, config: dict, weights: list[Path]) -> None:
    """Refuse sizes no checkpoint of these weight files can have, before transformers allocates them."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if key in config and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{directory}/config.json: {key} is {value!r}; it must be a positive integer")
    if not isinstance(config.get("model_type", ""), str):
        raise UsageError(f"{directory}/config.json: model_type is {config['model_type']!r}; it must be a name")
    weight_bytes = sum(p.stat().st_size for p in weights)
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 0
    width = config.get("hidden_size") or config.get("n_embd") or 0
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 0
    # every layer has its own weights (at least a byte each), the embedding has vocab x width of them
    heads = config.get("num_attention_heads") or config.get("n_head") or 0
    if (
        layers > weight_bytes
        or heads > max(width, 1)
        or (config.get("vocab_size") or 0) * width > 8 * weight_bytes
        or positions > MAX_POSITIONS
    ):
        raise UsageError(
            f"{directory}/config.json: sizes (layers {layers}, width {width}, vocabulary {config.get('vocab_size')}, "
            f"heads {heads}, positions {positions}) do not fit weights of {weight_bytes} bytes; the config does not belong to them"
        )


def _identity(files: list[Path]) -> dict:
    return {"files": {p.name: sha256_file(p) for p in sorted(files)}}


def ingest(spec, recipe=None) -> Bundle:
    """Turn the recipe's `model:` section into the first Bundle of the pipeline."""
    from accelc.compiler.bundle import chain
    from accelc.compiler.recipe import resolve_path

    if spec.builtin is not None:
        with progress.step(f"model: builtin {spec.builtin}"):
            directory = _builtin_dir(spec.builtin)
        description = f"builtin:{spec.builtin}"
    else:
        path = resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path)
        if not path.exists():
            raise UsageError(f"model path {path} does not exist")
        if path.suffix == ".gguf":
            from accelc import assets

            directory = assets.gguf_to_hf_dir(path)
            description = f"gguf:{path}"
        elif path.is_dir():
            directory = path
            description = f"hf:{path}"
        else:
            raise UsageError(f"model path {path}: expected {CausalLM.inputs}")
    check_checkpoint(directory, spec.trust_remote_code)
    with progress.step("model: hashing weights"):
        ident = _identity([p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"])
    ident["trust_remote_code"] = spec.trust_remote_code
    return Bundle(
        id=chain("", "source", ident),
        family="causal_lm",
        source={"description": description, "model_dir": str(directory), **ident},
        model_dir=directory,
    )


def load_model(directory: Path, trust_remote_code: bool = False):
    """The float32 torch model of record, in eval mode (pruned folders through their own loader:
    per-layer widths fail from_pretrained's shape check)."""
    import torch
    from transformers import AutoModelForCausalLM

    from accelc.compiler.pruning import materialize

    if materialize.is_pruned(directory):
        return materialize.load(directory)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}: cannot load the model ({str(exc).splitlines()[0]})") from None
    return model.eval()


def load_tokenizer(directory: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None


def encode_prompt(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt; instruction-tuned models get their chat template (as users expect)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        )
    return list(tokenizer(prompt)["input_ids"])


def eos_ids(directory: Path, tokenizer) -> tuple[int, ...]:
    """Every id that ends a generation: generation_config's (what transformers.generate stops
    on) plus the tokenizer's. They disagree for GGUF-converted chat models, whose tokenizer
    metadata names <|im_start|> while the turn really ends at <|im_end|>."""
    ids: list[int] = []
    config = directory / "generation_config.json"
    if config.exists():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


@register_family
class CausalLM(Family):
    """Decoder-only language models with a KV cache, from a Hugging Face checkpoint."""

    name = "causal_lm"
    title = "causal LM"
    inputs = "a Hugging Face checkpoint folder, a .gguf file or a built-in model"
    protocol = StepModel

    def builtins(self) -> list[str]:
        return builtin_names()

    def recognises_path(self, path: Path) -> bool:
        # every folder: an unsupported architecture's config is refused by check_input, by name
        return path.is_dir() or path.suffix == ".gguf"

    def check_input(self, spec, recipe=None) -> None:
        """A GGUF file's header and a checkpoint folder's config; the weights are read at ingest."""
        from accelc.compiler.recipe import resolve_path

        if spec.path is None:
            return
        path = resolve_path(recipe, spec.path) if recipe is not None else Path(spec.path)
        if path.suffix == ".gguf":
            from accelc import assets

            assets.gguf_architecture(path)
        elif path.is_dir():
            check_config(path, spec.trust_remote_code)

    def ingest(self, spec, recipe=None) -> Bundle:
        return ingest(spec, recipe)

    def graph_roles(self, bundle) -> dict[str, str]:
        return {"target": "decoder", **({"draft": "draft"} if "draft" in bundle.graphs else {})}

    def decode_plan(self, recipe, bundle) -> dict:
        from accelc.loops.plan import DecodePlan

        return DecodePlan.of({**recipe.decode.model_dump(mode="json"), **bundle.plan}).to_json_dict()

    def plan_warnings(self, directory: Path) -> list[str]:
        from accelc.families.causal_lm_run import plan_coverage

        return plan_coverage(directory)

    def run(self, art, args) -> int:
        from accelc.families.causal_lm_run import run

        return run(art, args)

    def prove(self, directory: Path, recipe, manifest: dict) -> tuple[dict, bool]:
        from accelc.families.causal_lm_proof import prove

        return prove(directory, recipe, manifest)

    def evaluate(self, art, text: str, spec) -> dict:
        from accelc.families.causal_lm_proof import evaluate

        return evaluate(art, text, spec)

    def bench(self, art, spec) -> dict:
        from accelc.compiler.benchmark import bench

        return bench(art.dir, spec)

    def report_bench(self, art, result: dict, figure: Path) -> None:
        from accelc.compiler.benchmark import report

        report(art, result, figure)
