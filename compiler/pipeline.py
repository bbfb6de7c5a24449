"""PassManager: run a recipe's passes and targets in order over a Bundle, with a hash-chained cache.

Every step (pass or target lowering) gets a fresh work directory. With the cache on, that
directory lives in the cache as `<root>/steps/<key>.tmp-<pid>` and is renamed to
`<root>/steps/<key>` only after the step succeeded, so the cache never holds half a result and
a compile interrupted at step k resumes at step k. With the cache off, work directories live in
a scratch folder that is deleted at the end. `key` is the bundle hash chain (bundle.py) over the
step's parameters and the recipe inputs it declares (inputs.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelc import progress
from accelc.compiler import registry
from accelc.compiler.bundle import Bundle, PassRecord, chain
from accelc.compiler.inputs import DeclaredView, content_identity, fingerprint
from accelc.errors import AccelcError, InternalError, PassFailed, UsageError

LOWERED_FILE = "lowered.json"


@dataclass(frozen=True)
class Lowered:
    """What a target produced: a directory of files plus the runtime config that loads them.

    `runtime` maps a backend name (e.g. "ort", "tvm") to its loader config; paths inside it are
    relative to `directory`, so the artifact can be moved.
    """

    kind: str
    directory: Path
    runtime: Mapping[str, Any]
    params: Mapping[str, Any] = field(default_factory=dict)
    status: str = "ran"  # "ran" | "cached", as a pass's PassRecord
    seconds: float = 0.0


@dataclass
class Context:
    """What a pass or target may use besides the bundle: its workdir, the recipe inputs it
    declared (`recipe`, a view that refuses the others), paths relative to the recipe, and the
    pass manager for a sub-pipeline of passes (cached and named in failures like the recipe's)."""

    source: Any  # the whole recipe: for resolving its relative paths, not for reading its sections
    workdir: Path
    step: str = "step"
    reads: tuple[str, ...] = ()
    manager: PassManager | None = None

    @property
    def recipe(self) -> DeclaredView:
        return DeclaredView(self.source, self.reads, self.step)

    def resolve(self, value: str) -> Path:
        from accelc.compiler.recipe import resolve_path

        return resolve_path(self.source, value)

    def run_passes(self, bundle: Bundle, steps: list[tuple[str, dict]], label: str) -> Bundle:
        """Run `steps` ((pass type, params) pairs) over `bundle` as the recipe's passes run."""
        if self.manager is None:
            raise InternalError(f"{self.step} runs passes of its own, and its context has no pass manager")
        return self.manager.run_steps(bundle, steps, label)


class StepCache:
    """Directory-per-key store. `enabled=False` gives scratch directories with the same API."""

    def __init__(self, root: Path | None):
        self.enabled = root is not None
        self._scratch = None if self.enabled else Path(tempfile.mkdtemp(prefix="accelc-nocache-"))
        self.root = (root / "steps") if self.enabled else self._scratch
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def hit(self, key: str) -> bool:
        return self.enabled and (self.path(key) / "DONE").exists()

    def reserve(self, key: str) -> Path:
        tmp = self.root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path) -> Path:
        final = self.path(key)
        (tmp / "DONE").write_text(str(time.time()))
        try:
            os.replace(tmp, final)
        except OSError:
            # another process committed the same key meanwhile: keep theirs, it is the same result
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _run_step(cache: StepCache, key: str, label: str, name: str, work):
    """Run `work(workdir)` in a fresh step directory, shown as `label`; name the step on failure."""
    tmp = cache.reserve(key)
    try:
        with progress.step(label):
            result = work(tmp)
    except AccelcError:
        cache.abandon(tmp)
        raise
    except KeyboardInterrupt:
        cache.abandon(tmp)
        raise
    except Exception as exc:  # a pass's own bug or a library error: exit 4 naming the step
        cache.abandon(tmp)
        raise PassFailed(name, f"{type(exc).__name__}: {exc}") from exc
    return tmp, result


def step_key(previous_id: str, step: str, params, cls, recipe) -> str:
    """The cache key of a step: the chain so far, the step and its version, its parameters, the
    recipe inputs it declares (inputs.fingerprint) and the content of the files its parameters
    name (Step.files), so changing any of them reruns it."""
    from accelc.compiler.recipe import resolve_path

    key = {"params": params, "reads": fingerprint(recipe, cls.reads)}
    named = cls.files(cls.Params(**params))
    if named:
        key["files"] = {name: content_identity(resolve_path(recipe, name)) for name in named}
    return chain(previous_id, f"{step}@{cls.version}", key)


def _check_family(cls, bundle: Bundle, title: str) -> None:
    """A step runs only on the model families it declares: the recipe check (families/
    applicability.py) says so before any work, and this holds for steps a pass runs itself."""
    if bundle.family not in cls.families:
        raise UsageError(f"{title} does not apply to a {bundle.family} model; it applies to: {', '.join(cls.families)}")


class PassManager:
    def __init__(self, recipe, cache: StepCache):
        self.recipe = recipe
        self.cache = cache

    def run_passes(self, bundle: Bundle) -> Bundle:
        steps = [(step.type, step.model_dump(mode="json", exclude={"type"})) for step in self.recipe.passes]
        return self.run_steps(bundle, steps)

    def run_steps(self, bundle: Bundle, steps: list[tuple[str, dict]], label: str = "") -> Bundle:
        """Run passes given as (type, params) pairs; `label` prefixes their names in messages
        (a sub-pipeline names the step that runs it)."""
        for name, given in steps:
            cls = registry.PASSES[name]
            params = cls.Params(**given).model_dump(mode="json")  # defaults filled, as a recipe step's are
            key = step_key(bundle.id, f"pass:{name}", params, cls, self.recipe)
            title = f"{label}pass {name}"
            _check_family(cls, bundle, title)
            start = time.perf_counter()
            if self.cache.hit(key):
                out = Bundle.load(self.cache.path(key))
                progress.status(f"{title}: cached ({key[:12]})")
                status = "cached"
            else:
                instance = cls(cls.Params(**params))
                tmp, out = _run_step(
                    self.cache,
                    key,
                    title,
                    f"{label}{name}",
                    lambda wd: instance.run(bundle, Context(self.recipe, wd, f"pass {name}", cls.reads, self)),
                )
                out = out.evolve(id=key)
                final = self.cache.commit(key, tmp)
                out = out.relocate(tmp, final)
                out.save(final)
                status = "ran"
            record = PassRecord(name, params, key, round(time.perf_counter() - start, 3), status)
            bundle = out.evolve(id=key, provenance=bundle.provenance + (record,))
        return bundle

    def lower(self, bundle: Bundle) -> list[Lowered]:
        results = []
        for step in self.recipe.targets:
            params = step.model_dump(mode="json", exclude={"kind"})
            cls = registry.TARGETS[step.kind]
            _check_family(cls, bundle, f"target {step.kind}")
            key = step_key(bundle.id, f"target:{step.kind}", params, cls, self.recipe)
            start = time.perf_counter()
            if self.cache.hit(key):
                meta = json.loads((self.cache.path(key) / LOWERED_FILE).read_text())
                progress.status(f"target {step.kind}: cached ({key[:12]})")
                seconds = round(time.perf_counter() - start, 3)
                results.append(Lowered(step.kind, self.cache.path(key), meta["runtime"], params, "cached", seconds))
                continue
            instance = cls(cls.Params(**params))
            tmp, runtime = _run_step(
                self.cache,
                key,
                f"target {step.kind}",
                step.kind,
                lambda wd: instance.lower(bundle, Context(self.recipe, wd, f"target {step.kind}", cls.reads, self)),
            )
            (tmp / LOWERED_FILE).write_text(json.dumps({"kind": step.kind, "runtime": runtime}, indent=2))
            final = self.cache.commit(key, tmp)
            results.append(Lowered(step.kind, final, runtime, params, "ran", round(time.perf_counter() - start, 3)))
        return results
