"""Fuzz: malformed recipes through `accelc validate` and `accelc compile --dry-run` (issue 22).

Every generated recipe ends with exit 2 (or 0 where the change leaves it valid), one message
and no traceback, and the pass cache is untouched. Unknown keys, missing models and junk
documents must be refused; a replaced value may happen to be valid, so it may also pass.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from fuzzkit import assert_refused, examples, unchanged
from hypothesis import given
from hypothesis import strategies as st

BASE = {
    "version": 1,
    "model": {"builtin": "tiny-llama"},
    "data": {"evaluation": "austen:persuasion"},
    "passes": [{"type": "export_onnx", "opset": 17}],
    "decode": {"strategy": "greedy", "max_new_tokens": 16, "temperature": 0.7},
    "targets": [{"kind": "cpu", "backends": ["ort"], "ort": {"intra_op_threads": 1}}],
    "eval": {
        "parity": {"greedy_tokens": 4, "decode_steps": 2, "atol": 0.001},
        "perplexity": {"enabled": False, "window": 64},
        "bench": {"enabled": False, "repeats": 3},
    },
}


def mappings(node, path=()):
    """Every key path in BASE that holds a mapping (where an unknown key can go)."""
    if isinstance(node, dict):
        yield path
        for k, v in node.items():
            yield from mappings(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from mappings(v, path + (i,))


def leaves(node, path=()):
    """Every key path in BASE (sections, lists and scalars alike) that a value can replace."""
    if path:
        yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, path + (i,))


MAPPINGS = list(mappings(BASE))
LEAVES = list(leaves(BASE))

# YAML-representable junk: wrong types, out-of-range and huge numbers, odd strings, containers
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "~", "yes", "0x1F", "1e999", ".nan", "-.inf", "tiny-llama", "../../etc/passwd", "ort"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
unknown_names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)


def put(data, path, value):
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def delete(data, path):
    node = data
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]


def allowed_keys(path):
    node = BASE
    for part in path:
        node = node[part]
    return set(node)


@pytest.fixture
def recipe_cli(cli, tmp_path):
    """Write recipe text (or bytes) and run it through validate and compile --dry-run."""
    cache = tmp_path / "cache"
    recipe = tmp_path / "recipe.yaml"

    def run(content, *, also_ok=False, overrides=()):
        recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
        sets = [a for o in overrides for a in ("--set", o)]
        codes = []
        with unchanged(cache, tmp_path / "out"):
            for args in (("validate", recipe, *sets), ("compile", recipe, "--dry-run", "-o", tmp_path / "out", *sets)):
                code, _, err = assert_refused(cli("-q", *args), (2,), also_ok=also_ok)
                if code:
                    assert err.startswith("accelc: error:"), err
                codes.append(code)
        assert codes[0] == codes[1], "validate and compile --dry-run disagree"
        return codes[0]

    def dump(data):
        return yaml.safe_dump({**data, "cache": {"dir": str(cache)}}, sort_keys=False, allow_unicode=True)

    run.dump = dump
    return run


def test_the_base_recipe_is_valid(recipe_cli):
    assert recipe_cli(recipe_cli.dump(BASE), also_ok=True) == 0


@examples(60)
@given(where=st.sampled_from(MAPPINGS), name=unknown_names, value=values)
def test_unknown_keys_at_every_level(recipe_cli, where, name, value):
    if name in allowed_keys(where) or (where == () and name == "cache"):
        return
    data = copy.deepcopy(BASE)
    put(data, where + (name,), value)
    recipe_cli(recipe_cli.dump(data))


@examples(120)
@given(where=st.sampled_from(LEAVES), value=values)
def test_wrong_types_and_out_of_range_values(recipe_cli, where, value):
    data = copy.deepcopy(BASE)
    put(data, where, value)
    recipe_cli(recipe_cli.dump(data), also_ok=True)


@examples(40)
@given(where=st.sampled_from(LEAVES))
def test_missing_sections_and_keys(recipe_cli, where):
    data = copy.deepcopy(BASE)
    delete(data, where)
    # without a model (or its one source) there is nothing to compile: refused; else defaults fill in
    recipe_cli(recipe_cli.dump(data), also_ok=where[:1] != ("model",))


@examples(60)
@given(document=st.binary(max_size=300))
def test_binary_junk_documents(recipe_cli, document):
    recipe_cli(document)


@examples(80)
@given(
    position=st.floats(0, 1),
    insert=st.sampled_from(
        [
            b"\t",
            b"\x00",
            b"\xff\xfe",
            b"\xc3",
            b"&a ",
            b"*a",
            b"*nowhere",
            b"!!python/name:os.system ",
            b": ",
            b"- ",
            b"{",
            b"]",
            b"\n---\n",
            b"\r",
            b"\xef\xbb\xbf",
            b"%YAML 9.9\n",
            b"<<: *x\n",
        ]
    )
    | st.binary(min_size=1, max_size=8),
)
def test_yaml_byte_level_damage(recipe_cli, position, insert):
    text = recipe_cli.dump(BASE).encode()
    at = int(position * len(text))
    recipe_cli(text[:at] + insert + text[at:], also_ok=True)


@examples(60)
@given(
    key=st.sampled_from([".".join(map(str, p)) for p in LEAVES] + ["nope", "passes.9.opset", "", ".", "a..b"]),
    value=st.text(max_size=30),
)
def test_set_overrides(recipe_cli, key, value):
    recipe_cli(recipe_cli.dump(BASE), also_ok=True, overrides=[f"{key}={value}"])


def laughs(levels=8):
    """A "billion laughs" document: nested aliases, 9**levels leaves if expanded."""
    lines = ["  l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines)


ODDITIES = {
    "tab indentation": "model:\n\tbuiltin: tiny-llama\n",
    "duplicate top-level key": "model:\n  builtin: tiny-llama\nmodel:\n  builtin: tiny-gpt2\n",
    "duplicate nested key": "model:\n  builtin: tiny-llama\n  builtin: tiny-gpt2\n",
    "duplicate key in a pass": "model:\n  builtin: tiny-llama\npasses:\n  - type: export_onnx\n    opset: 17\n    opset: 18\n",
    "alias into the wrong section": "model: &m\n  builtin: tiny-llama\ndecode: *m\n",
    "undefined alias": "model: *nowhere\n",
    "laughs under an unknown key": "model:\n  builtin: tiny-llama\nbomb:\n" + laughs(),
    "laughs as the passes": "model:\n  builtin: tiny-llama\nbomb:\n" + laughs() + "\npasses: *l7\n",
    "laughs as a list of backends": "model:\n  builtin: tiny-llama\nx:\n"
    + laughs()
    + "\ntargets:\n  - kind: cpu\n    backends: *l7\n",
    "scalar document": "42\n",
    "list document": "- model\n- passes\n",
    "string document": "tiny-llama\n",
    "empty document": "",
    "comment only": "# nothing\n",
    "two documents": "model:\n  builtin: tiny-llama\n---\nmodel:\n  builtin: tiny-llama\n",
    "python tag": "model: !!python/object/apply:os.system ['true']\n",
    "binary tag": "model:\n  builtin: !!binary aGVsbG8=\n",
    "timestamp version": "version: 2001-12-14\nmodel:\n  builtin: tiny-llama\n",
    "complex key": "model:\n  builtin: tiny-llama\n? [a, b]\n: 1\n",
    "integer key": "model:\n  builtin: tiny-llama\n1: 2\n",
    "null key": "model:\n  builtin: tiny-llama\n~: 2\n",
    "huge integer": "model:\n  builtin: tiny-llama\npasses:\n  - type: export_onnx\n    opset: 1" + "0" * 5000 + "\n",
    "deep nesting": "model:\n  builtin: tiny-llama\ndecode: " + "[" * 500 + "]" * 500 + "\n",
    "NUL byte": "model:\n  builtin: tiny-llama\n\x00\n",
    "non-UTF-8 bytes": b"model:\n  builtin: tiny-\xff\xfellama\n",
    "UTF-16 document": "model:\n  builtin: tiny-llama\n".encode("utf-16"),
    "model is a string": "model: tiny-llama\n",
    "model with both sources": "model:\n  builtin: tiny-llama\n  path: ./x\n",
    "unknown builtin": "model:\n  builtin: tiny-everything\n",
    "model path missing": "model:\n  path: ./does/not/exist\n",
    "version 2": "version: 2\nmodel:\n  builtin: tiny-llama\n",
}


@pytest.mark.parametrize("name", list(ODDITIES))
def test_yaml_oddities(recipe_cli, name):
    recipe_cli(ODDITIES[name])
