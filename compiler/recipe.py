"""Recipes: YAML in, a validated pydantic `Recipe` out, with errors that point at file:line.

The schema is built from the pass and target registries, so a new pass's `Params` is validated,
documented in `accelc schema` and listed in error messages without touching this module.
`--set key.path=value` overrides are applied to the raw YAML data before validation, so they are
checked exactly like recipe content. YAML is read with `safe_load` only: a recipe never runs code.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model, model_validator

from accelc.compiler import registry
from accelc.errors import RecipeError
from accelc.loops import registry as loop_registry

RECIPE_VERSION = 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    """Where the model comes from: exactly one of `path` or `builtin`."""

    path: str | None = Field(None, description="Hugging Face checkpoint folder, a .gguf file or an .onnx file")
    builtin: str | None = Field(
        None,
        description="built-in model: smollm2-135m-instruct (real, fetched once) or a tiny seeded "
        "test model (tiny-llama, tiny-gpt2, tiny-opt, tiny-qwen2)",
    )
    trust_remote_code: bool = Field(False, description="allow the checkpoint's own Python code (off unless asked)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


class CalibrationSource(Section):
    """One source of a calibration mixture."""

    text: str = Field(
        description="a text spec: austen:NAME, shakespeare:NAME, pydoc:topics, debian-doc:PKG, dir:PATH or a file"
    )
    weight: float = Field(1.0, gt=0, description="its share of the calibration windows, relative to the others")


# A text spec or a mixture: the tag picks the branch before validation, so an error names only
# the branch the recipe wrote (and _data_path drops the tag from the key path it reports).
UNION_TAGS = {"one-text", "mixture"}
TextOrMixture = Annotated[
    Annotated[str, Tag("one-text")] | Annotated[list[CalibrationSource], Field(min_length=1), Tag("mixture")],
    Discriminator(lambda v: "one-text" if isinstance(v, str) else "mixture"),
]


class DataSpec(Section):
    calibration: TextOrMixture = Field(
        "austen:emma",
        description="text for calibration: one text spec (austen:NAME, shakespeare:NAME, pydoc:topics, "
        "debian-doc:PKG, dir:PATH or a file path), or a list of {text, weight} sources mixed in proportion",
    )
    evaluation: str = Field("austen:persuasion", description="held-out text for perplexity")


class DecodeSpec(Section):
    # the loops of the loop table that need no draft; passes such as speculative rewrite the loop
    strategy: Literal[loop_registry.names(needs_draft=False)] = Field(
        "greedy", description="generation loop written into decode/plan.json"
    )
    max_new_tokens: int = Field(64, gt=0, description="default continuation length for `accelc run`")
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    chat_template: bool = Field(
        True, description="wrap `accelc run` prompts in the tokenizer's chat template when it has one"
    )


class ParitySpec(Section):
    """Numerical parity of every lowered backend against the source torch model."""

    atol: float = Field(1e-3, gt=0, description="max abs logit difference allowed (fp32 exports measure ~1e-5)")
    prompts: list[str] = Field(
        default_factory=lambda: ["The capital of France is", "Once upon a time, in a small village,"], min_length=1
    )
    decode_steps: int = Field(4, ge=0, description="teacher-forced single-token steps compared after prefill")
    greedy_tokens: int = Field(16, ge=0, description="greedy tokens that must equal transformers' generate")


class PerplexitySpec(Section):
    enabled: bool = True
    window: int = Field(512, gt=1)
    stride: int | None = Field(
        None, gt=0, description="tokens scored per window after the first (default: the window, disjoint windows)"
    )
    max_windows: int = Field(8, gt=0)
    backends: list[str] = Field(
        default_factory=lambda: ["torch", "ort"],
        description="backends to score; untuned TVM is too slow for long windows",
    )
    max_ratio: float = Field(
        1.05, gt=1, description="fail (exit 5) if a backend's perplexity exceeds torch's by this factor"
    )
    max_ratio_vs_source: float | None = Field(
        None,
        gt=1,
        description="for pruned models (whose source model is "
        "scored too): fail (exit 5) if torch's perplexity exceeds the source "
        "model's by this factor",
    )

    @model_validator(mode="after")
    def _stride_follows_window(self):
        if self.stride is None:
            self.stride = self.window
        elif self.stride > self.window:
            raise ValueError(
                f"stride {self.stride} exceeds the window {self.window}: tokens between windows would go "
                "unscored; use a stride of at most the window, or leave it unset"
            )
        return self


class BenchSpec(Section):
    enabled: bool = True
    prompt_tokens: int = Field(64, gt=0)
    new_tokens: int = Field(32, gt=0)
    repeats: int = Field(3, gt=0, description="measurements per backend; medians are reported")
    backends: list[str] = Field(default_factory=lambda: ["torch", "ort", "tvm"])
    tvm_new_tokens: int | None = Field(
        None, gt=0, description="fewer tokens for untuned TVM, which is slow (default: 8, at most new_tokens)"
    )

    @model_validator(mode="after")
    def _tvm_tokens_follow_new_tokens(self):
        if self.tvm_new_tokens is None:
            self.tvm_new_tokens = min(8, self.new_tokens)
        return self


class EvalSpec(Section):
    parity: ParitySpec = Field(default_factory=ParitySpec)
    perplexity: PerplexitySpec = Field(default_factory=PerplexitySpec)
    bench: BenchSpec = Field(default_factory=BenchSpec)


class OutputSpec(Section):
    dir: str = Field("artifacts/out", description="artifact directory (written atomically)")
    profile: Literal["dev", "deploy"] = Field(
        "dev",
        description="dev: ship the torch model of record beside the lowered backends (run, eval and bench "
        "against torch); deploy: ship only what the lowered backends read, the torch weights referenced "
        "by size and sha256 in the manifest (`model_of_record`) after the proof ran against them",
    )


class CacheSpec(Section):
    enabled: bool = True
    dir: str | None = Field(None, description="default: $ACCELC_CACHE_DIR or ~/.cache/accelc")


def _tagged(cls, tag_key: str, tag: str):
    """The Params model of a pass/target with its discriminator field added (`type:`/`kind:`)."""
    return create_model(
        f"{cls.__name__}Step",
        __base__=cls.Params,
        **{tag_key: (Literal[tag], Field(..., description=(cls.__doc__ or "").strip().split("\n")[0]))},
    )


@functools.lru_cache(maxsize=1)
def recipe_model() -> type[BaseModel]:
    """The Recipe pydantic model, built once from whatever passes and targets are registered."""
    registry.load_all()
    pass_models = [_tagged(c, "type", n) for n, c in sorted(registry.PASSES.items())]
    target_models = [_tagged(c, "kind", k) for k, c in sorted(registry.TARGETS.items())]
    # Union[tuple] spells a union of a run-time list of types; `X | Y` cannot
    PassStep = Annotated[Union[tuple(pass_models)], Field(discriminator="type")]  # noqa: UP007
    TargetStep = Annotated[Union[tuple(target_models)], Field(discriminator="kind")]  # noqa: UP007
    return create_model(
        "Recipe",
        __base__=Section,
        version=(Literal[RECIPE_VERSION], RECIPE_VERSION),
        model=(ModelSpec, ...),
        data=(DataSpec, Field(default_factory=DataSpec)),
        passes=(list[PassStep], Field(default_factory=list)),
        decode=(DecodeSpec, Field(default_factory=DecodeSpec)),
        targets=(list[TargetStep], Field(default_factory=list)),
        eval=(EvalSpec, Field(default_factory=EvalSpec)),
        output=(OutputSpec, Field(default_factory=OutputSpec)),
        cache=(CacheSpec, Field(default_factory=CacheSpec)),
    )


def json_schema() -> dict:
    schema = recipe_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "accelc recipe"
    return schema


# ---------------------------------------------------------------------------------------- loading


def _line_map(
    node: yaml.Node, path: tuple = (), lines: dict | None = None, seen: set | None = None
) -> dict[tuple, int]:
    """Map every key path of a composed YAML document to its 1-based line.

    An alias is the same node object as its anchor: each node is walked once, or nested aliases
    (a "billion laughs" document) would make this walk exponential. Paths through an alias fall
    back to the line of the key that holds it. A key given twice in one mapping is refused: YAML
    loaders keep the last one silently, so the first would be ignored without a word."""
    lines = {} if lines is None else lines
    seen = set() if seen is None else seen
    lines[path] = node.start_mark.line + 1
    if id(node) in seen:
        return lines
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                if key in first_line:
                    where = ".".join(str(p) for p in path + (key,))
                    raise DuplicateKey(
                        f"{line}: {where}: duplicate key (first given on line {first_line[key]}); keep one"
                    )
                first_line[key] = line
            key_path = path + (key,)
            _line_map(value_node, key_path, lines, seen)
            lines[key_path] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), lines, seen)
    return lines


class DuplicateKey(Exception):
    """A mapping that names one key twice (raised by _line_map, reported with the recipe's file)."""


def _data_path(loc: tuple, data: Any) -> tuple:
    """Turn a pydantic error location into a path through the recipe data.

    Discriminated unions add the tag as a location part (passes[0].export_onnx.opset); such
    parts name no key in the data and are dropped. The first key that is absent (an unknown or
    a missing key) ends the path.
    """
    tags = set(registry.PASSES) | set(registry.TARGETS) | UNION_TAGS
    out, cur = [], data
    for part in loc:
        if (isinstance(cur, dict) and part in cur) or (
            isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        ):
            out.append(part)
            cur = cur[part]
        elif isinstance(part, str) and (part in tags or part.startswith("function-")):
            continue
        else:
            out.append(part)
            break
    return tuple(out)


def _dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _allowed_keys(data: Any, path: tuple) -> list[str] | None:
    """Keys allowed in the mapping that holds `path`'s last key, read off the schema."""
    model: Any = recipe_model()
    walk = path[:-1]
    prefix: list[str] = []
    if len(path) >= 3 and path[0] in ("passes", "targets") and isinstance(path[1], int):
        # a pass/target step: its schema is the registered class's Params plus the tag key
        tag_key, table = ("type", registry.PASSES) if path[0] == "passes" else ("kind", registry.TARGETS)
        step = data[path[0]][path[1]]
        cls = table.get(step.get(tag_key)) if isinstance(step, dict) else None
        if cls is None:
            return None
        model, walk = cls.Params, path[2:-1]
        prefix = [tag_key] if len(path) == 3 else []
    for part in walk:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = field.annotation
        if getattr(model, "__origin__", None) is list:
            model = model.__args__[0]
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return prefix + list(model.model_fields)


def _format_errors(exc: ValidationError, data: Any, source: str, lines: dict, overrides: dict) -> str:
    msgs = []
    for err in exc.errors():
        path = _data_path(err["loc"], data)
        where = overrides.get(path) or (
            f"{source}:{lines[path]}" if path in lines else f"{source}:{lines.get(path[:-1], lines.get((), 1))}"
        )
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(data, path)
            msg = f"unknown key '{path[-1]}'" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "missing":
            msg = f"missing required key '{path[-1]}'"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        msgs.append(f"{where}: {_dotted(path)}: {msg}")
    return "invalid recipe:\n  " + "\n  ".join(msgs)


def _apply_override(data: dict, assignment: str) -> tuple:
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    if not parts or any(p == "" for p in parts):
        raise RecipeError(f"--set {assignment!r}: empty key in path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:  # a ReaderError (control character) has a reason, not a problem
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise RecipeError(f"--set {assignment!r}: value is not valid YAML ({problem})") from None
    except ValueError as exc:  # an integer beyond Python's 4300-digit conversion limit
        raise RecipeError(f"--set {assignment!r}: value is not usable ({exc})") from None
    cur: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(cur, list):
            if not isinstance(part, int) or part >= len(cur):
                raise RecipeError(
                    f"--set {key}: index {part} is out of range for {_dotted(tuple(parts[:i]))} ({len(cur)} items)"
                )
            cur = cur[part]
        elif isinstance(cur, dict):
            cur = cur.setdefault(part, [] if isinstance(nxt, int) else {})
        else:
            raise RecipeError(f"--set {key}: {_dotted(tuple(parts[:i]))} is not a mapping or list")
    last = parts[-1]
    if isinstance(cur, list):
        if not isinstance(last, int) or last >= len(cur):
            raise RecipeError(f"--set {key}: index {last} is out of range")
        cur[last] = value
    elif isinstance(cur, dict):
        cur[last] = value
    else:
        raise RecipeError(f"--set {key}: parent is not a mapping or list")
    return tuple(parts)


def load_recipe(path: str | Path, overrides: list[str] = ()):
    """Read, override and validate a recipe. Raises RecipeError with file:line messages."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{source}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{source}: cannot read recipe ({exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character: its str() spans two lines
        line = text.count("\n", 0, exc.position) + 1
        raise RecipeError(f"{source}:{line}: malformed YAML: {exc.reason} (character {exc.character!r})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: malformed YAML: {problem}") from None
    except ValueError as exc:  # an integer beyond Python's 4300-digit conversion limit
        raise RecipeError(f"{source}: a number in the recipe is too long ({str(exc).split(';')[0]})") from None
    except RecursionError:
        raise RecipeError(f"{source}: the recipe is nested too deeply to read; a recipe is a few levels deep") from None
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty; it needs at least a 'model' section")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}:1: a recipe is a mapping of sections (model, passes, targets, ...), not a {type(data).__name__}"
        )
    try:
        lines = _line_map(node) if node is not None else {}
    except DuplicateKey as exc:
        raise RecipeError(f"{source}:{exc}") from None
    override_sites = {}
    for assignment in overrides:
        override_sites[_apply_override(data, assignment)] = f"--set {assignment}"
    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, data, source, lines, override_sites)) from None
    object.__setattr__(recipe, "_source", path.resolve())
    return recipe


def recipe_dict(recipe) -> dict:
    """The resolved recipe as plain data (defaults filled in), for recipe.resolved.yaml."""
    return recipe.model_dump(mode="json")


def recipe_hash(recipe) -> str:
    return hashlib.sha256(json.dumps(recipe_dict(recipe), sort_keys=True).encode()).hexdigest()


def resolve_path(recipe, value: str) -> Path:
    """Paths in a recipe are relative to the recipe file, as users expect when they copy one."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    base = getattr(recipe, "_source", None)
    return (base.parent / p) if base is not None else p.resolve()
