"""Read throughput of restorer.data.urlio against the plain client of each protocol, side by side.

A local file, Python's HTTP server and a moto S3 server, all on 127.0.0.1 (so this measures the
reader's overhead and request pattern, not a network). For S3 it compares fsspec block sizes:
each block is one ranged GET, so fewer, larger blocks cost fewer requests.

examples:
  python bench/urlio.py                    # a 32 MiB object; needs the dev extra (moto[server], s3fs)
  python bench/urlio.py --mb 8             # quicker

The last line is ``s3_urlio_vs_get_object: <ratio>x``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchcli import parser

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from objstore import S3_ENV, FaultServer  # noqa: E402 (the tests' servers)

from restorer.data import urlio  # noqa: E402


def drain(f) -> int:
    n = 0
    while chunk := f.read(1 << 20):
        n += len(chunk)
    f.close()
    return n


def best_mb_s(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e6


def with_block(size: int, url: str, policy) -> int:
    old, urlio.FSSPEC_BLOCK = urlio.FSSPEC_BLOCK, size
    try:
        return drain(urlio.open_url(url, policy))
    finally:
        urlio.FSSPEC_BLOCK = old


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--mb", type=int, default=32, help="object size in MiB")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    from moto.server import ThreadedMotoServer

    data = os.urandom(args.mb << 20)
    root = Path(tempfile.mkdtemp(prefix="bench-urlio-"))
    (root / "s.tar").write_bytes(data)
    http = FaultServer(root)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench-bucket")
    s3.put_object(Bucket="bench-bucket", Key="s.tar", Body=data)
    policy = urlio.ReadPolicy()
    s3_url = "s3://bench-bucket/s.tar"
    rows = [  # (name, fn, baseline row name)
        ("local  open().read", lambda: drain(open(root / "s.tar", "rb")), None),
        ("local  urlio", lambda: drain(urlio.open_url(root / "s.tar", policy)), "local  open().read"),
        ("http   urllib", lambda: drain(urllib.request.urlopen(http.url("s.tar"))), None),  # noqa: S310
        ("http   urlio", lambda: drain(urlio.open_url(http.url("s.tar"), policy)), "http   urllib"),
        ("s3     boto3 get_object", lambda: drain(s3.get_object(Bucket="bench-bucket", Key="s.tar")["Body"]), None),
        ("s3     urlio, 4 MiB blocks", lambda: with_block(4 << 20, s3_url, policy), "s3     boto3 get_object"),
        (
            f"s3     urlio, {urlio.FSSPEC_BLOCK >> 20} MiB blocks (default)",
            lambda: with_block(urlio.FSSPEC_BLOCK, s3_url, policy),
            "s3     boto3 get_object",
        ),
    ]
    res = {}
    try:
        for name, fn, _ in rows:
            res[name] = best_mb_s(fn)
    finally:
        http.stop()
        moto.stop()
    print(f"## {args.mb} MiB object, 127.0.0.1, best of 3")
    print(f"{'reader':42s} {'MB/s':>9s}  vs plain client")
    for name, _, base in rows:
        print(f"{name:42s} {res[name]:9.1f}  {res[name] / res[base or name]:.2f}x")
    print(f"s3_urlio_vs_get_object: {res[rows[-1][0]] / res[rows[4][0]]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
