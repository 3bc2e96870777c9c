"""Published learned optimizers: fetch (file:// and loopback HTTP), verify, cache, offline."""

import functools
import http.server
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from metaopt.fileio import sha256_hex
from metaopt.lopt import SmallFCLOpt
from metaopt.lopt.hub import PUBLISHED, HubError, pretrained

GOLDEN = Path("/work/shared/golden")
if not GOLDEN.is_dir():
    GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"


@pytest.fixture
def release(tmp_path) -> Path:
    """A release-format folder (params msgpack + config.gin) from the golden small_fc."""
    src = tmp_path / "release"
    src.mkdir()
    theta, gin = GOLDEN / "small_fc_lopt_theta.msgpack", GOLDEN / "small_fc_lopt_config.gin"
    if not theta.is_file():
        pytest.skip("golden small_fc release files not available")
    (src / "params").write_bytes(theta.read_bytes())
    (src / "config.gin").write_bytes(gin.read_bytes())
    return src


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(release):
    _CountingHandler.requests = []
    handler = functools.partial(_CountingHandler, directory=str(release))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_file_url_fetch_and_load(release, tmp_path):
    lopt = pretrained("small_fc_test", url=release.as_uri(), cache_dir=tmp_path / "cache")
    assert isinstance(lopt, SmallFCLOpt)
    assert (tmp_path / "cache" / "small_fc_test" / "pins.json").is_file()


def test_http_fetch_then_cache_reuse(server, tmp_path):
    cache = tmp_path / "cache"
    pretrained("small_fc_test", url=server, cache_dir=cache)
    assert sorted(_CountingHandler.requests) == ["/config.gin", "/params"]
    pretrained("small_fc_test", url=server, cache_dir=cache)
    assert len(_CountingHandler.requests) == 2  # no second download


def test_checksum_mismatch_refused(release, tmp_path):
    good = sha256_hex((release / "params").read_bytes())
    with pytest.raises(HubError, match="does not match"):
        pretrained("x", url=release.as_uri(), cache_dir=tmp_path,
                   expected_sha256={"params": "0" * 64})
    assert not (tmp_path / "x" / "params").exists()
    lopt = pretrained("x", url=release.as_uri(), cache_dir=tmp_path,
                      expected_sha256={"params": good})
    assert isinstance(lopt, SmallFCLOpt)


def test_trust_on_first_use_detects_changed_file(release, tmp_path):
    pretrained("x", url=release.as_uri(), cache_dir=tmp_path)
    (tmp_path / "x" / "config.gin").write_text("# tampered\n")
    with pytest.raises(HubError, match="does not match"):
        pretrained("x", url=release.as_uri(), cache_dir=tmp_path)


def test_offline_error_names_url_and_manual_install(tmp_path):
    url = "http://127.0.0.1:9/nowhere"  # port 9 (discard): connection refused
    with pytest.raises(HubError) as err:
        pretrained("velo", url=url, cache_dir=tmp_path)
    msg = str(err.value)
    assert f"{url}/params" in msg and str(tmp_path / "velo") in msg and "\n" not in msg


def test_velo_is_published_without_invented_pins():
    entry = PUBLISHED["velo"]
    assert entry.url.startswith("https://storage.googleapis.com/gresearch/learned_optimization/")
    assert entry.sha256 is None


def test_unknown_name():
    with pytest.raises(HubError, match="no pretrained"):
        pretrained("no_such_lopt")
