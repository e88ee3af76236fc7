"""restorer.data.urlio against real servers on 127.0.0.1: every fault (dropped connection, 5xx, stall,
missing object) through HTTP, S3 (moto) and pipe:, with retries counted and every test bounded."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from restorer.data import urlio
from restorer.data.urlio import ReadPolicy, UrlNotFound, UrlReadError, open_url, read_bytes, read_text
from restorer.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FAST = ReadPolicy(connect_timeout=2, read_timeout=2, retries=3, backoff=0.01)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def shard(tiny_shards: Path) -> bytes:
    """A real shard of the builder's format (tar of PNG tiles of real photos)."""
    return (tiny_shards / "train" / "shard-000000.tar").read_bytes()


def _read_all(url: str, policy: ReadPolicy = FAST) -> tuple[bytes, urlio.RetryingStream]:
    with open_url(url, policy) as f:
        return f.read(), f.raw


def _keys(url: str, policy: ReadPolicy = FAST) -> list[str]:
    with open_url(url, policy) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        return [m.name for m in tar]


# ----------------------------------------------------------------------------------- local
def test_local_path_and_file_url(tiny_shards: Path, shard: bytes):
    path = tiny_shards / "train" / "shard-000000.tar"
    assert read_bytes(path, FAST) == shard
    assert read_bytes(f"file://{path}", FAST) == shard
    assert len(_keys(str(path))) == 8  # 4 samples x (png, json)


def test_missing_local_file_is_not_found_at_once(tmp_path: Path):
    t0 = time.monotonic()
    with pytest.raises(UrlNotFound) as ei:
        open_url(tmp_path / "nope.tar", FAST)
    assert time.monotonic() - t0 < 1
    assert isinstance(ei.value, FileNotFoundError) and ei.value.attempts == 1
    assert str(ei.value) == f"{tmp_path / 'nope.tar'}: no such file"


# ----------------------------------------------------------------------------------- http
def test_http_read_streams_a_shard(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    data, raw = _read_all(http_faults.url("s.tar"))
    assert data == shard and raw.failures == 0
    assert len(_keys(http_faults.url("s.tar"))) == 8
    assert http_faults.hits["/s.tar"] == 2


def test_http_dropped_connection_resumes_with_range(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "drop", "drop")
    data, raw = _read_all(http_faults.url("s.tar"))
    assert data == shard
    assert raw.failures == 2 and http_faults.hits["/s.tar"] == 3
    # each retry asked for the rest only, from where the previous connection broke
    starts = [s for p, s in http_faults.ranges if p == "/s.tar"]
    assert len(starts) == 2 and 0 < starts[0] < starts[1] < len(shard)


def test_http_5xx_is_retried_then_succeeds(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "503", "500")
    data, raw = _read_all(http_faults.url("s.tar"))
    assert data == shard and raw.failures == 2 and http_faults.hits["/s.tar"] == 3


def test_http_5xx_forever_gives_one_clear_error_after_the_retries(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "503", always=True)
    url = http_faults.url("s.tar")
    with pytest.raises(UrlReadError) as ei:
        open_url(url, FAST)
    assert http_faults.hits["/s.tar"] == FAST.retries + 1
    assert str(ei.value) == f"{url}: HTTP 503 Service Unavailable (after 4 attempts)"
    assert not isinstance(ei.value, UrlNotFound)


def test_http_missing_object_is_not_retried(http_faults):
    url = http_faults.url("absent.tar")
    with pytest.raises(UrlNotFound) as ei:
        open_url(url, FAST)
    assert http_faults.hits["/absent.tar"] == 1
    assert str(ei.value) == f"{url}: HTTP 404 Not Found"


def test_http_injected_404_on_an_existing_path(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "404")
    with pytest.raises(UrlNotFound):
        open_url(http_faults.url("s.tar"), FAST)


def test_http_stall_times_out_within_the_configured_seconds(http_faults, shard: bytes):
    """The server accepts the request and never answers (the hang of issue 14)."""
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "stall", always=True)
    policy = ReadPolicy(connect_timeout=1, read_timeout=1, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(UrlReadError) as ei:
        open_url(http_faults.url("s.tar"), policy)
    took = time.monotonic() - t0
    assert 2 <= took < 6, took  # 2 attempts x 1 s read timeout (slack for a loaded machine)
    assert "timed out" in str(ei.value) and "after 2 attempts" in str(ei.value)
    assert http_faults.hits["/s.tar"] == 2


def test_http_stall_mid_body_times_out_and_resumes(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "stall-body")
    policy = ReadPolicy(connect_timeout=1, read_timeout=1, retries=2, backoff=0.01)
    t0 = time.monotonic()
    data, raw = _read_all(http_faults.url("s.tar"), policy)
    assert data == shard and raw.failures == 1
    assert time.monotonic() - t0 < 3
    starts = [s for p, s in http_faults.ranges if p == "/s.tar"]  # resumed from the bytes delivered
    assert len(starts) == 1 and 0 < starts[0] <= len(shard) // 2


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/s.tar"
    with pytest.raises(UrlReadError) as ei:
        open_url(url, FAST)
    assert ei.value.attempts == 4 and "ConnectionRefusedError" in str(ei.value)


def test_backoff_doubles_and_is_capped():
    p = ReadPolicy(backoff=0.5, backoff_max=3)
    assert [p.delay(i) for i in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 3, 3]


def test_waits_between_retries_follow_the_policy(http_faults, shard: bytes):
    (http_faults.root / "s.tar").write_bytes(shard)
    http_faults.fail("s.tar", "503", always=True)
    slept: list[float] = []
    policy = ReadPolicy(retries=3, backoff=0.25)
    with pytest.raises(UrlReadError):
        urlio.RetryingStream(http_faults.url("s.tar"), policy, sleep=slept.append)
    assert slept == [0.25, 0.5, 1.0]


# ----------------------------------------------------------------------------------- pipe:
def test_pipe_reads_a_command_output(tiny_shards: Path, shard: bytes):
    path = tiny_shards / "train" / "shard-000000.tar"
    assert read_bytes(f"pipe:cat {path}", FAST) == shard


def test_pipe_watchdog_kills_a_silent_command(tmp_path: Path):
    marker = tmp_path / "pid"
    policy = ReadPolicy(read_timeout=1, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(UrlReadError) as ei:
        read_bytes(f"pipe:echo $$ >> {marker}; sleep 60", policy)
    assert time.monotonic() - t0 < 4
    assert "wrote nothing for 1 s (killed)" in str(ei.value) and ei.value.attempts == 2
    for pid in marker.read_text().split():  # both shells are gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_pipe_slow_but_steady_command_is_not_killed():
    """The watchdog is an idle timeout: 8 bytes every 0.3 s for 2.4 s with a 1 s limit is fine."""
    cmd = "for i in 1 2 3 4 5 6 7 8; do printf 01234567; sleep 0.3; done"
    data, raw = _read_all(f"pipe:{cmd}", ReadPolicy(read_timeout=1, retries=0))
    assert data == b"01234567" * 8 and raw.failures == 0


def test_pipe_command_stalling_mid_stream_restarts_and_skips_what_was_read(tmp_path: Path, shard: bytes):
    src = tmp_path / "s.tar"
    src.write_bytes(shard)
    flag = tmp_path / "stalled-once"
    half = len(shard) // 2
    # first run: half the bytes, then silence; second run: everything
    cmd = f"if [ -e {flag} ]; then cat {src}; else touch {flag}; head -c {half} {src}; sleep 60; fi"
    data, raw = _read_all(f"pipe:{cmd}", ReadPolicy(read_timeout=1, retries=2, backoff=0.01))
    assert data == shard and raw.failures == 1


def test_pipe_command_writing_much_to_stderr_does_not_block(tiny_shards: Path, shard: bytes):
    path = tiny_shards / "train" / "shard-000000.tar"
    noise = "head -c 300000 /dev/zero | tr '\\0' x >&2"  # more than a pipe buffer
    assert read_bytes(f"pipe:{noise}; cat {path}", ReadPolicy(read_timeout=5, retries=0)) == shard


def test_pipe_failing_command_reports_its_status_and_stderr():
    with pytest.raises(UrlReadError) as ei:
        read_bytes("pipe:echo 'curl: (7) Failed to connect' >&2; exit 7", FAST)
    assert str(ei.value).endswith("command exited with status 7: curl: (7) Failed to connect (after 4 attempts)")


# ----------------------------------------------------------------------------------- s3
def _put(bucket: str, key: str, data: bytes) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=bucket[len("s3://") :], Key=key, Body=data)


def test_s3_read_and_read_text(s3_bucket: str, shard: bytes):
    _put(s3_bucket, "p/train/shard-000000.tar", shard)
    _put(s3_bucket, "p/manifest.json", b'{"format": 1}')
    data, raw = _read_all(f"{s3_bucket}/p/train/shard-000000.tar")
    assert data == shard and raw.failures == 0
    assert len(_keys(f"{s3_bucket}/p/train/shard-000000.tar")) == 8
    assert read_text(f"{s3_bucket}/p/manifest.json", FAST) == '{"format": 1}'


def test_s3_missing_object_is_not_found(s3_bucket: str):
    t0 = time.monotonic()
    with pytest.raises(UrlNotFound) as ei:
        open_url(f"{s3_bucket}/absent.tar", FAST)
    assert time.monotonic() - t0 < 5
    assert str(ei.value) == f"{s3_bucket}/absent.tar: no such object"


def test_s3_stalled_endpoint_times_out(http_faults, monkeypatch):
    """An S3 endpoint that accepts and never answers: bounded by the policy, then one error."""
    from objstore import use_s3_endpoint

    pytest.importorskip("s3fs")
    use_s3_endpoint(monkeypatch, http_faults.base)
    http_faults.fail("*", "stall", always=True)
    policy = ReadPolicy(connect_timeout=1, read_timeout=1, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(UrlReadError) as ei:
        open_url("s3://bucket/k.tar", policy)
    assert time.monotonic() - t0 < 8
    assert ei.value.attempts == 2 and str(ei.value).startswith("s3://bucket/k.tar: ")


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_s3_failing_endpoint_is_retried_then_reported(http_faults, monkeypatch, fault):
    from objstore import use_s3_endpoint

    pytest.importorskip("s3fs")
    use_s3_endpoint(monkeypatch, http_faults.base)
    http_faults.fail("*", fault, always=True)
    with pytest.raises(UrlReadError) as ei:
        open_url("s3://bucket/k.tar", FAST)
    assert ei.value.attempts == FAST.retries + 1
    assert str(ei.value).startswith("s3://bucket/k.tar: ")
    # the backend's own retries are mostly turned off: no hidden retry storm
    assert sum(http_faults.hits.values()) <= 4 * (FAST.retries + 1)


# ----------------------------------------------------------------------------------- setup errors
def test_missing_backend_is_one_line_naming_the_extra():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(UserError) as ei:
        open_url("gs://bucket/shard-000000.tar", FAST)
    assert str(ei.value) == (
        "gs://bucket/shard-000000.tar: gs:// needs a package that is not installed: pip install 'restorer[gcs]'"
    )


def test_missing_s3fs_is_one_line_naming_the_extra():
    code = (
        "import sys; sys.modules['s3fs'] = None\n"
        "from restorer.errors import UserError\nfrom restorer.data.urlio import open_url\n"
        "try:\n    open_url('s3://b/x.tar')\nexcept UserError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == (
        "s3://b/x.tar: s3:// needs a package that is not installed: pip install 'restorer[s3]'"
    ), out.stderr


def test_policy_from_environment(monkeypatch):
    monkeypatch.setenv("RESTORER_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("RESTORER_READ_RETRIES", "5")
    p = ReadPolicy.from_env(backoff=0.1)
    assert (p.read_timeout, p.retries, p.backoff, p.connect_timeout) == (7.5, 5, 0.1, 10.0)
    monkeypatch.setenv("RESTORER_CONNECT_TIMEOUT", "soon")
    with pytest.raises(UserError, match="RESTORER_CONNECT_TIMEOUT='soon': not a number"):
        ReadPolicy.from_env()


def test_errors_survive_pickling():
    """Raised in DataLoader workers, they cross process boundaries."""
    e = pickle.loads(pickle.dumps(UrlNotFound("s3://b/k", "no such object", 1)))
    assert isinstance(e, UrlNotFound) and str(e) == "s3://b/k: no such object"
