"""Every command the README shows parses: each `restorer ...`, `python -m shard_tools ...`,
`make shards ARGS=...`, `accelerate launch ... launch/train.py ...` and `sbatch ... train.sbatch ...`
line in its code blocks is fed to the real argument parser (nothing is executed). The commands that
run for real are exercised by the other tests and by `make demo`."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised right after a successful parse, so the command itself never runs."""


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("$ "):
                line = line[2:]
            for part in line.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                if words:
                    commands.append(words)
    return commands


def _train_main():
    spec = importlib.util.spec_from_file_location("readme_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_train"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.main


def route(words: list[str]):
    """(callable, argv) for a README command line, or None for commands of other tools."""
    words = [w for w in words if "=" not in w or w.startswith("-") or w.startswith("ARGS=")]  # drop VAR=value
    if not words:
        return None
    head = Path(words[0]).name
    if head == "restorer":
        from restorer.cli import main

        return main, words[1:]
    if head.startswith("python") and words[1:3] == ["-m", "shard_tools"]:
        from shard_tools.__main__ import main

        return main, words[3:]
    if head == "make" and len(words) > 2 and words[1] == "shards" and words[2].startswith("ARGS="):
        from shard_tools.__main__ import main

        return main, ["build", *shlex.split(words[2][len("ARGS=") :])]
    for marker in ("launch/train.py", "launch/slurm/train.sbatch"):
        if marker in words and head in ("accelerate", "sbatch"):
            return _train_main, words[words.index(marker) + 1 :]
    return None


def test_readme_has_the_two_commands_first():
    text = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split()[0:2] for line in first_block.strip().splitlines()] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("words", [w for w in readme_commands() if route(w)], ids=lambda w: " ".join(w)[:80])
def test_readme_command_parses(words, monkeypatch):
    func, argv = route(words)
    if func is _train_main:
        func = _train_main()
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        if self.prog in ("restorer", "python -m shard_tools"):  # a dispatcher's own parser, if any
            return real(self, args, namespace)
        raise Parsed(self.prog)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed):
        func(argv)


def test_readme_commands_were_found():
    routed = [w for w in readme_commands() if route(w)]
    kinds = {Path(w[0]).name for w in routed}
    assert {"restorer", "accelerate", "sbatch", "make"} <= kinds | {"python"} and len(routed) >= 12
