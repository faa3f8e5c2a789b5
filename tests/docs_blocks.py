"""The code blocks of the Markdown documentation, as a test runs them (pure: no I/O
but reading the files).

A fenced block's language says what it is. Blocks a user would paste (shell,
Python, JavaScript, HTML, console transcripts) are run by
tests/integration/test_docs_examples.py unless an HTML comment on the line
just above the fence says otherwise:

    <!-- docs-test: skip: WHY -->         not run (say why: a benchmark, a synopsis ...)
    <!-- docs-test: stream until TEXT --> a command that never ends (curl -N): run it
                                          until TEXT appears in its output, then stop it
    <!-- docs-test: stream until TEXT while publishing to CHANNEL -->
                                          the same, while another user publishes to CHANNEL
    <!-- docs-test: config -->            a yaml block that is a gateway configuration
                                          (or part of one): loaded as `--config` would
    <!-- docs-test: policy -->            a yaml block that is a policy file: loaded

Data blocks (yaml, json) are parsed; ``text`` blocks are output or pictures and
not run; a block without a language is refused, so that nothing paste-able
slips through unclassified.
A paste-able block of a language no runner knows, unmarked, fails the test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNABLE = {
    "sh": "shell", "bash": "shell", "shell": "shell",
    "console": "console",
    "python": "python", "py": "python",
    "js": "js", "javascript": "js",
}  # fmt: skip
PASTEABLE = set(RUNNABLE) | {"html", "ts", "typescript", "powershell", "zsh", "fish"}
DATA = {"yaml", "yml", "json"}

_FENCE = re.compile(r"^(\s*)(`{3,})([\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str | None  # what the docs-test comment says, if any

    @property
    def where(self) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{shown}:{self.line}"

    @property
    def skipped(self) -> bool:
        return self.marker is not None and self.marker.startswith("skip:")

    @property
    def loads_as(self) -> str | None:
        """``config`` or ``policy`` for a yaml block the gateway must accept."""
        return self.marker if self.marker in ("config", "policy") else None

    @property
    def stream_until(self) -> str | None:
        if self.marker is None or not self.marker.startswith("stream until "):
            return None
        text = self.marker.removeprefix("stream until ").split(" while publishing to ")[0]
        return text.strip().strip('"')

    @property
    def publishing_to(self) -> str | None:
        if self.stream_until is None or " while publishing to " not in (self.marker or ""):
            return None
        return (self.marker or "").split(" while publishing to ")[1].strip()


def doc_files() -> list[Path]:
    """README.md, docs/*.md and the clients' READMEs: what a user reads."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "clients").glob("*/README.md"))
    return [f for f in files if f.is_file()]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent, ticks, language = fence.group(1), fence.group(2), fence.group(3).lower()
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        body = [line.removeprefix(indent) for line in lines[i + 1 : j]]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        found.append(
            Block(path, i + 1, language, "\n".join(body) + "\n", marker and marker.group(1))
        )
        i = j + 1
    return found


def problem(block: Block) -> str | None:
    """Why this block cannot be run as the docs stand (None: it can, or it is not code)."""
    if block.marker is not None and not (block.skipped or block.stream_until or block.loads_as):
        return f"{block.where}: unknown docs-test marker {block.marker!r}"
    if block.loads_as and block.language not in ("yaml", "yml"):
        return f"{block.where}: a {block.marker} marker on a {block.language or 'plain'} block"
    if block.skipped:
        return (
            None
            if block.marker and len(block.marker) > len("skip: ") + 3
            else (f"{block.where}: a skipped block must say why")
        )
    if block.language == "":
        return f"{block.where}: a block without a language: name it (text for output or a picture)"
    if block.language in PASTEABLE and block.language not in RUNNABLE:
        return (
            f"{block.where}: a {block.language} block no test can run: make it one of "
            f"{sorted(RUNNABLE)} or mark it <!-- docs-test: skip: WHY -->"
        )
    return None


# --- what a Python block promises ---------------------------------------------

_PRINT_EXPECT = re.compile(r"^\s*print\(.*\)\s*#\s?(.+)$")


def expected_prints(code: str) -> list[str]:
    """``print(...)  # {"type":"ack",...}``: the comment is what that line prints
    (``…`` or ``...`` stand for any text)."""
    return [m.group(1).strip() for line in code.splitlines() if (m := _PRINT_EXPECT.match(line))]


def matches(pattern: str, text: str) -> bool:
    parts = re.split(r"…|\.\.\.", pattern)
    return re.fullmatch(".*".join(re.escape(p) for p in parts), text, re.DOTALL) is not None


# --- console transcripts --------------------------------------------------------


@dataclass(frozen=True)
class Step:
    command: str
    output: list[str]  # expected lines, with … / ... wildcards


def console_steps(text: str) -> list[Step]:
    """``$ command`` lines (``\\`` continues them), each followed by its expected output."""
    steps: list[Step] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        steps.append(Step(command, output))
    return steps
