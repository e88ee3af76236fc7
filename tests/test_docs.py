"""The commands README.md and docs/*.md show still exist and take the options they are shown with.

Commands are taken from fenced code blocks (a ``$ `` prompt is dropped) and from inline code spans:
``restorer SUB ...``, ``python -m shard_tools SUB ...``, ``python launch/X.py ...``,
``python bench/X.py ...`` (``python3`` / ``.venv/bin/`` forms too), ``accelerate launch ...
launch/train.py ...`` and ``sbatch ... launch/slurm/train.sbatch ...`` (options after the script are
launch/train.py's) and ``make TARGET`` (run as ``make -n TARGET``). For each distinct program its
``--help`` (a dry form: it measures, trains and writes nothing) must exit 0, and every ``--option``
written after the program in the docs must appear in that help, so a renamed or removed option
fails here instead of in a user's shell.

Cost: one ``--help`` per distinct program, run in-process by two worker processes (torch is
imported once per worker), beside the ``make -n`` calls.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
PYTHON = re.compile(r"^(\S*/)?python3?$")
SEPARATORS = {"&&", "||", ";", "|"}
# a program whose unknown options are passed on to another one (launch/demo.py: parse_known_args)
FORWARDS = {("script", "launch/demo.py"): ("script", "launch/train.py")}


def _lines(text: str) -> list[str]:
    """Candidate command lines of one document: fenced blocks line by line, then inline spans."""
    lines = []
    for block in FENCE.findall(text):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    outside = FENCE.sub("", text)
    lines += [" ".join(span.split()) for span in INLINE.findall(outside)]
    return [line.strip().removeprefix("$ ").strip() for line in lines]


def _program(words: list[str]):
    """(program key, its options as written) of one shell command, or None for other tools.

    Keys: ("restorer", SUB), ("shard_tools", SUB), ("script", "launch/train.py"), ("make", TARGET)."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before a command
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if Path(head).name == "restorer" and head in ("restorer", ".venv/bin/restorer"):
        sub = next((w for w in words[1:] if not w.startswith("-")), None)
        if sub is None:
            return ("restorer", None), words[1:]
        return ("restorer", sub), words[words.index(sub) + 1 :]
    if PYTHON.match(head) and len(words) > 1:
        if words[1:3] == ["-m", "shard_tools"]:
            sub = words[3] if len(words) > 3 and not words[3].startswith("-") else None
            return ("shard_tools", sub), words[4 if sub else 3 :]
        if re.match(r"^(launch|bench)/[\w/]+\.py$", words[1]):
            return ("script", words[1]), words[2:]
        return None
    if Path(head).name == "accelerate" and words[1:2] == ["launch"] and "launch/train.py" in words:
        return ("script", "launch/train.py"), words[words.index("launch/train.py") + 1 :]
    if head == "sbatch" and "launch/slurm/train.sbatch" in words:
        return ("script", "launch/train.py"), words[words.index("launch/slurm/train.sbatch") + 1 :]
    if head == "make" and len(words) > 1 and not words[1].startswith("-") and "=" not in words[1]:
        args = [w[len("ARGS=") :] for w in words[2:] if w.startswith("ARGS=")]
        if words[1] == "shards" and args:  # make shards ARGS='...' = shard_tools build ...
            return ("make", "shards"), [("shard_tools", "build"), *shlex.split(args[0])]
        return ("make", words[1]), []
    return None


def documented_commands() -> list[tuple[tuple[str, str | None], list[str], str]]:
    """(program key, options written after it, where) for every command the docs show."""
    found = []
    for path in DOCS:
        for line in _lines(path.read_text()):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue  # prose or output with an odd quote, not a command
            command: list[str] = []
            for word in [*words, "&&"]:
                if word not in SEPARATORS:
                    command.append(word)
                    continue
                hit = _program(command) if command else None
                if hit:
                    found.append((hit[0], hit[1], f"{path.relative_to(REPO)}: {' '.join(command)}"))
                command = []
    return found


COMMANDS = documented_commands()


def _options(written: list) -> list[tuple[tuple[str, str | None] | None, str]]:
    """(program the option belongs to, or None for the command's own program; option name)."""
    out: list[tuple[tuple[str, str | None] | None, str]] = []
    target = None
    for word in written:
        if isinstance(word, tuple):
            target = word
        elif word.startswith("--") and len(word) > 2:
            out.append((target, word.split("=", 1)[0]))
    return out


PROGRAMS = sorted({key for key, _, _ in COMMANDS} | {t for _, w, _ in COMMANDS for t, _ in _options(w) if t}, key=str)
PROGRAMS += sorted({FORWARDS[k] for k in PROGRAMS if k in FORWARDS} - set(PROGRAMS), key=str)


# --------------------------------------------------------------------------- --help of each program


def _help_in_process(key: list) -> dict:
    """Run one program's --help inside this (worker) process: its exit status and output."""
    kind, name = key
    out = io.StringIO()
    code: object = 0
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if kind == "restorer":
                from restorer.cli import main

                main([name, "--help"] if name else ["--help"])
            elif kind == "shard_tools":
                sys.argv = ["shard_tools", *([name] if name else []), "--help"]
                runpy.run_module("shard_tools", run_name="__main__", alter_sys=True)
            else:
                script = REPO / name
                sys.argv = [name, "--help"]
                sys.path.insert(0, str(script.parent))  # bench scripts import their neighbours
                runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        code = 0 if done.code is None else done.code
    except BaseException:  # reported as the program's failure
        code = "exception"
        out.write(traceback.format_exc())
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
    return {"code": code, "out": out.getvalue()}


def _run_workers(keys: list) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RESTORER_FAULTS", None)

    def worker(chunk):
        proc = subprocess.run(
            [sys.executable, __file__, json.dumps(chunk)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"help worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.splitlines()[-1])

    def make_dry(target):
        proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=120)
        return {"code": proc.returncode, "out": proc.stdout + proc.stderr}

    python_keys = [list(k) for k in keys if k[0] != "make"]
    chunks = [python_keys[0::2], python_keys[1::2]]
    results = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        makes = {k: pool.submit(make_dry, k[1]) for k in keys if k[0] == "make"}
        for answer in pool.map(worker, [c for c in chunks if c]):
            results.update({(k[0], k[1]): v for k, v in answer})
        results.update({k: f.result() for k, f in makes.items()})
    return results


@pytest.fixture(scope="module")
def helps():
    return _run_workers(PROGRAMS)


def test_the_docs_show_commands_of_every_kind():
    kinds = {key[0] for key, _, _ in COMMANDS}
    scripts = {key[1] for key, _, _ in COMMANDS if key[0] == "script"}
    assert {"restorer", "shard_tools", "script", "make"} <= kinds, kinds
    assert "launch/train.py" in scripts and any(s.startswith("bench/") for s in scripts), scripts
    assert len(COMMANDS) >= 40, len(COMMANDS)


@pytest.mark.parametrize("key", PROGRAMS, ids=lambda k: " ".join(str(p) for p in k))
def test_help_exits_0(helps, key):
    answer = helps[key]
    shown = sorted({where for k, _, where in COMMANDS if k == key})[:3]
    assert answer["code"] == 0, f"{key}: --help exited {answer['code']} (shown in {shown}):\n{answer['out'][-2000:]}"


def _listed(option: str, text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", text) is not None


@pytest.mark.parametrize("key", [k for k in PROGRAMS if k[0] != "make"], ids=lambda k: " ".join(str(p) for p in k))
def test_documented_options_exist(helps, key):
    missing = []
    for k, written, where in COMMANDS:
        for target, option in _options(written):
            if (target or k) != key:
                continue
            text = helps[key]["out"] + (helps[FORWARDS[key]]["out"] if key in FORWARDS else "")
            if not _listed(option, text):
                missing.append(f"{option}  ({where})")
    assert not missing, f"{key}: options the docs give that --help does not list:\n" + "\n".join(sorted(set(missing)))


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_pages_resolve():
    broken = []
    for path in DOCS:
        for target in LINK.findall(FENCE.sub("", path.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


if __name__ == "__main__":  # a worker: run each program's --help in this process, answer as JSON
    keys = json.loads(sys.argv[1])
    answers = [(k, _help_in_process(k)) for k in keys]
    sys.stdout = sys.__stdout__
    print(json.dumps(answers))
