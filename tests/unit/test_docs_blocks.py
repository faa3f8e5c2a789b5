"""How the docs' code blocks are found and judged (tests/docs_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_blocks import Block, blocks, console_steps, expected_prints, matches, problem

DOC = """# A page

<!-- docs-test: skip: a benchmark, minutes long -->
```sh
python -m bench.load
```

<!-- docs-test: stream until ": rabbitgate" -->

```bash
curl -N https://localhost:8444/events
```

```html
<script type="module">import "./x.js";</script>
```

<!-- docs-test: skip: -->
```js
x()
```

<!-- docs-test: sometimes -->
```python
print(1)
```

```text
output, not code
```

```
unnamed
```

    ```console
    $ rabbitgate policy check \\
        policies
    5 rules in 3 files, digest ..., 0 warnings
    ```
"""


@pytest.fixture
def page(tmp_path: Path) -> list[Block]:
    path = tmp_path / "page.md"
    path.write_text(DOC)
    return blocks(path)


def test_blocks_their_languages_and_markers(page: list[Block]) -> None:
    assert [(b.language, b.skipped, b.stream_until) for b in page] == [
        ("sh", True, None),
        ("bash", False, ": rabbitgate"),
        ("html", False, None),
        ("js", True, None),
        ("python", False, None),
        ("text", False, None),
        ("", False, None),
        ("console", False, None),
    ]
    assert page[0].text == "python -m bench.load\n"
    assert page[0].where == "page.md:4"
    assert page[-1].text.startswith("$ rabbitgate policy check")  # indentation removed


def test_what_cannot_run_is_a_problem(page: list[Block]) -> None:
    problems = [problem(b) for b in page]
    assert problems[0] is None and problems[1] is None and problems[5] is None
    assert problems[2] is not None and "a html block no test can run" in problems[2]
    assert problems[3] is not None and "must say why" in problems[3]
    assert problems[4] is not None and "unknown docs-test marker" in problems[4]
    assert problems[6] is not None and "without a language" in problems[6]
    assert problems[7] is None


def test_console_steps_join_continued_lines() -> None:
    steps = console_steps("$ a \\\n    b\nout 1\nout 2\n$ c\n")
    assert [(s.command, s.output) for s in steps] == [("a  b", ["out 1", "out 2"]), ("c", [])]


def test_print_comments_are_the_expected_output() -> None:
    code = 'x = 1  # not a print\nprint(x)  # {"seq":…}\n    print(y)\nprint(z)  # done\n'
    assert expected_prints(code) == ['{"seq":…}', "done"]


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ('{"type":"ack","id":1,"seq":…}', '{"type":"ack","id":1,"seq":1042}', True),
        ('{"type":"ack","id":1,"seq":null}', '{"type":"ack","id":1,"seq":0}', False),
        ("digest ..., 0 warnings", "digest 0d5d5ea2339c, 0 warnings", True),
        ("a.b", "axb", False),  # a dot is a dot
        ("exact", "exact but longer", False),
    ],
)
def test_wildcards(pattern: str, text: str, expected: bool) -> None:
    assert matches(pattern, text) is expected


def test_a_stream_may_name_a_channel_to_publish_to(tmp_path: Path) -> None:
    path = tmp_path / "sse.md"
    path.write_text(
        '<!-- docs-test: stream until "event: message" while publishing to chat.lobby -->\n'
        "```sh\ncurl -N https://localhost:8444/events?channel=chat.lobby\n```\n"
    )
    (block,) = blocks(path)
    assert (block.stream_until, block.publishing_to) == ("event: message", "chat.lobby")
    assert problem(block) is None
