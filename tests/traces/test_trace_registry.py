"""Registry lookup, trace location, and fetch with checksum verification (file:// URLs, no network)."""
from __future__ import annotations

import hashlib

import pytest

from dlora_sim.traces import TraceNotFoundError, registry
from dlora_sim.traces.cli import main as cli_main

CONTENT = b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.5,10,2\n"


def test_real_registry_is_complete():
    reg = registry.load_registry()
    for name in ("azure_conv", "azure_code", "mooncake_conversation", "mooncake_synthetic",
                 "servegen_large", "servegen_small", "maf2019", "maf2021"):
        e = reg[name]
        assert e.licence and e.citation and e.format and e.files
        assert all(f.url.startswith("https://") for f in e.files)
    assert len(reg["servegen_large"].files) == 162
    assert all(f.sha256 and len(f.sha256) == 64 for n in ("azure_conv", "servegen_small") for f in reg[n].files)


@pytest.fixture
def tmp_registry(tmp_path, monkeypatch):
    """A registry with one trace whose URL is a local file; caches redirected into tmp_path."""
    src = tmp_path / "published.csv"
    src.write_bytes(CONTENT)

    def write(sha: str | None):
        reg = tmp_path / "registry.yaml"
        sha_line = f"        sha256: {sha}\n" if sha else "        sha256: null\n"
        reg.write_text("traces:\n  tiny:\n    format: azure_llm\n    folder: tiny-folder\n    licence: CC0\n"
                       "    citation: test\n    files:\n      - path: tiny.csv\n"
                       f"        url: {src.as_uri()}\n" + sha_line)
        return reg

    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(write(hashlib.sha256(CONTENT).hexdigest())))
    monkeypatch.setenv("DLORA_TRACE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DLORA_SHARED_TRACES", raising=False)
    return tmp_path, write


def test_fetch_verifies_and_resolves(tmp_registry):
    tmp, _ = tmp_registry
    folder, unverified = registry.fetch("tiny")
    assert unverified == {}
    assert (folder / "tiny.csv").read_bytes() == CONTENT
    assert registry.resolve("tiny") == tmp / "cache" / "tiny-folder" / "tiny.csv"
    assert registry.is_present("tiny")


def test_fetch_checksum_mismatch_leaves_nothing(tmp_registry, monkeypatch):
    tmp, write = tmp_registry
    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(write("f" * 64)))
    with pytest.raises(registry.ChecksumError, match="mismatch"):
        registry.fetch("tiny")
    assert not (tmp / "cache").exists()   # no half-written .part file, nor the folders made for it


def test_bad_checksum_in_registry_is_an_error(tmp_registry, monkeypatch):
    tmp, write = tmp_registry
    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(write("1234")))
    with pytest.raises(ValueError, match="64 hex digits"):
        registry.load_registry()


def test_fetch_refuses_unverified_unless_allowed(tmp_registry, monkeypatch):
    tmp, write = tmp_registry
    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(write(None)))
    with pytest.raises(registry.ChecksumError, match="no sha256"):
        registry.fetch("tiny")
    _, unverified = registry.fetch("tiny", allow_unverified=True)
    assert unverified == {"tiny.csv": hashlib.sha256(CONTENT).hexdigest()}
    assert (tmp / "cache" / "tiny-folder" / "tiny.csv").exists()


def test_corrupted_cached_file_is_refetched(tmp_registry):
    tmp, _ = tmp_registry
    registry.fetch("tiny")
    cached = tmp / "cache" / "tiny-folder" / "tiny.csv"
    cached.write_bytes(b"garbage")
    registry.fetch("tiny")
    assert cached.read_bytes() == CONTENT


def test_not_found_lists_places_and_fetch_command(tmp_registry):
    with pytest.raises(TraceNotFoundError) as err:
        registry.resolve("tiny")
    msg = str(err.value)
    assert "cache" in msg and "xdg" in msg and "dlora-trace fetch tiny" in msg


def test_explicit_path_wins(tmp_registry):
    tmp, _ = tmp_registry
    assert registry.resolve("tiny", path=tmp / "published.csv") == tmp / "published.csv"
    with pytest.raises(TraceNotFoundError):
        registry.resolve("tiny", path=tmp / "nope.csv")


def test_cli_list_fetch_stats(tmp_registry, capsys):
    tmp, _ = tmp_registry
    assert cli_main(["list"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli_main(["fetch", "tiny"]) == 0
    assert cli_main(["stats", "tiny", "--out", str(tmp / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 requests" in out and (tmp / "out" / "tiny-rate.png").exists()
    assert cli_main(["stats", "unknown-trace"]) == 1


def test_fetched_tar_archive_is_unpacked(tmp_path, monkeypatch):
    import tarfile

    inner = tmp_path / "invocations_per_function_md.anon.d01.csv"
    inner.write_text("HashOwner,HashApp,HashFunction,Trigger\n")
    archive = tmp_path / "maf.tar.xz"
    with tarfile.open(archive, "w:xz") as tf:
        tf.add(inner, arcname=inner.name)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    reg = tmp_path / "registry.yaml"
    reg.write_text(f"traces:\n  maf:\n    format: maf2019\n    folder: maf\n    files:\n"
                   f"      - path: maf.tar.xz\n        url: {archive.as_uri()}\n        sha256: '{digest}'\n")
    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(reg))
    folder, _ = registry.fetch("maf", dest_root=tmp_path / "cache")
    assert (folder / inner.name).read_text() == inner.read_text()


def test_fetch_from_an_unreachable_url_says_what_to_do_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    reg = tmp_path / "registry.yaml"
    url = "http://127.0.0.1:9/tiny.csv"   # the discard port: refused at once, no network needed
    reg.write_text("traces:\n  tiny:\n    format: azure_llm\n    folder: tiny-folder\n    files:\n"
                   f"      - path: tiny.csv\n        url: {url}\n        sha256: '{'0' * 64}'\n")
    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(reg))
    monkeypatch.setenv("DLORA_TRACE_DIR", str(tmp_path / "cache"))
    assert cli_main(["fetch", "tiny"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dlora-trace:")]
    assert len(err) == 1 and url in err[0] and "by hand" in err[0] and "tiny-folder" in err[0]
    assert not (tmp_path / "cache").exists()            # no empty folder left behind


def test_stats_accepts_a_trace_file(tmp_registry, capsys):
    tmp, _ = tmp_registry
    f = tmp / "tiny.csv"
    f.write_bytes(CONTENT)
    assert cli_main(["stats", str(f), "--out", str(tmp / "out")]) == 0   # recognised as the `tiny` format
    assert "1 requests" in capsys.readouterr().out
    other = tmp / "mystery.csv"
    other.write_bytes(CONTENT)
    assert cli_main(["stats", str(other)]) == 2
    assert "--path" in capsys.readouterr().err


def test_unverified_traces_hint_the_flag_fetch_needs(tmp_registry, monkeypatch):
    tmp, write = tmp_registry
    monkeypatch.setenv("DLORA_TRACE_REGISTRY", str(write(None)))
    with pytest.raises(TraceNotFoundError, match="fetch tiny --allow-unverified"):
        registry.resolve("tiny")
