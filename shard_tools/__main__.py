"""``python -m shard_tools {build,verify,merge}``: pack image datasets into WebDataset shards."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from restorer.config import parse_config
from restorer.errors import UserError, cli_entry, setup_logging
from shard_tools.config import BuildConfig

# Each command imports its module when it runs, not here: those modules import torch (through
# webdataset and restorer.data). Measured side by side on the shared 2-core machine (/usr/bin/time,
# 5 runs each, load average 20): `python -m shard_tools --help` took 8.8-9.5 s this way and
# 67-81 s with these imports at the top. Re-measured 2026-11-30 (load average 5, one run each):
# importing this module 0.7 s; shard_tools.build 6.6 s, .verify 7.9 s, .merge 8.4 s, .remote 7.2 s.

BUILD_EPILOG = """\
examples:
  python -m shard_tools build                       # scikit-image's photos (offline demo set)
  python -m shard_tools build --out data/shards --bsds ~/datasets/BSR --workers 4
  python -m shard_tools build --div2k ~/dl --bsds ~/dl/BSR_bsds500.tgz --folder ~/photos
  python -m shard_tools build --openimages ~/oi/train_0 ~/oi/validation \\
        ~/oi/train-images-boxable-with-rotation.csv --max-images 20000
  python -m shard_tools build --config shards.yaml --verify
  # to a bucket (S3 or S3-compatible; endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID ...)
  python -m shard_tools build --bsds ~/dl/BSR_bsds500.tgz --out s3://my-bucket/shards/bsds
  # two machines, then join:
  python -m shard_tools build --div2k D --out part0 --num-jobs 2 --job-index 0
  python -m shard_tools build --div2k D --out part1 --num-jobs 2 --job-index 1
  python -m shard_tools merge data/shards part0 part1

Output: OUT/<split>/shard-NNNNNN.tar (+ sizes.json) and OUT/manifest.json. Re-running the same
command skips the shards that are already complete; an interrupted build resumes. An OUT holding
anything else (another build's shards, other files) is refused unless --overwrite; never an input.
An s3:// or gs:// OUT is built in --stage-dir (default: a temporary folder) and then uploaded,
manifest.json last; shards already in the bucket with the same hash are not uploaded again.
Exit status: 0 ok, 1 verify found problems, 2 bad input/output (one line on stderr).
"""

VERIFY_EPILOG = """\
examples:
  python -m shard_tools verify data/shards
  python -m shard_tools verify s3://my-bucket/shards/bsds

Re-hashes every shard listed in DIR/manifest.json; prints one line per missing, resized or
changed shard (and shards not in the manifest); exit status 1 when any.
"""

MERGE_EPILOG = """\
examples:
  python -m shard_tools merge data/shards part0 part1 part2

Joins the outputs of `build --num-jobs K --job-index I` runs (same settings) into OUT: shards are
hard-linked (or copied) and renumbered, manifests and sizes.json combined. OUT must be new or
empty (--overwrite replaces it); the parts are only read.
"""


def _build(argv: list[str]) -> int:
    cfg = parse_config(
        BuildConfig,
        argv,
        prog="python -m shard_tools build",
        description="Build WebDataset shards of lossless image tiles.",
        epilog=BUILD_EPILOG,
    )
    from shard_tools.build import build  # after parsing, so --help stays fast: see the note above

    manifest = build(cfg)
    return 1 if manifest.get("verify_problems") else 0


def _parser(command: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"python -m shard_tools {command}",
        epilog=epilog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _verify(argv: list[str]) -> int:
    from shard_tools.verify import verify  # see the note on imports above

    p = _parser("verify", "Check shards against their manifest.", VERIFY_EPILOG)
    p.add_argument("dir", help="shard folder or URL (s3://bucket/prefix) holding manifest.json")
    ns = p.parse_args(argv)
    problems = verify(ns.dir)
    for line in problems:
        print(line)
    if not problems:
        print(f"{ns.dir}: all shards match the manifest")
    return 1 if problems else 0


def _merge(argv: list[str]) -> int:
    from shard_tools.merge import merge  # see the note on imports above (both import torch)
    from shard_tools.remote import is_remote

    p = _parser("merge", "Join the parts of a multi-machine build.", MERGE_EPILOG)
    p.add_argument("out", help="output shard folder (new or empty, unless --overwrite)")
    p.add_argument("parts", nargs="+", help="part folders written by build --job-index")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an OUT that exists and is not empty (the builder's files there are removed first)",
    )
    ns = p.parse_args(argv)
    for where in [ns.out, *ns.parts]:
        if is_remote(where):
            raise UserError(f"{where}: merge works on local folders (merge locally, then upload)")
    m = merge(Path(ns.out), [Path(x) for x in ns.parts], overwrite=ns.overwrite)
    for split, info in m["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    return 0


COMMANDS = {"build": _build, "verify": _verify, "merge": _merge}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(
            "usage: python -m shard_tools {build,verify,merge} [--help]\n\n"
            "  build   pack datasets into shards (python -m shard_tools build --help)\n"
            "  verify  re-hash shards against the manifest\n"
            "  merge   join the parts of a multi-machine build",
            file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
        )
        if argv and argv[0] not in ("-h", "--help"):
            raise UserError(f"unknown command {argv[0]!r} (choose build, verify or merge)")
        return 0 if argv else 2
    setup_logging()
    for noisy in ("PIL", "botocore", "aiobotocore", "s3fs"):  # an s3:// --out logs per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
