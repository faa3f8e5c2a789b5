"""PolicyReloader against a stand-in node: state, logging, and the folder watcher."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.core.reloader import PolicyReloader, is_policy_file
from gateway.policy.rules import PolicySet, load_policy_set

RULES = """\
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: chat
    subscribe: [{who}]
    publish: [role:member]
"""


class FakeNode:
    """What the reloader needs of a Node: ``policies`` and ``swap_policies``."""

    def __init__(self, policies: PolicySet) -> None:
        self.policies = policies
        self.swaps: list[PolicySet] = []
        self.fail: Exception | None = None

    async def swap_policies(self, policies: PolicySet) -> int:
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        self.policies = policies
        self.swaps.append(policies)
        return 2


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "policies"
    path.mkdir()
    (path / "10-chat.yaml").write_text(RULES.format(who="role:member"))
    return path


@pytest.fixture
def node(folder: Path) -> FakeNode:
    return FakeNode(load_policy_set(folder))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def watching(folder: Path, node: FakeNode) -> AsyncIterator[PolicyReloader]:
    reloader = PolicyReloader(node, folder, quiet_ms=50, debounce_ms=500)  # type: ignore[arg-type]
    await reloader.start()
    yield reloader
    await reloader.stop()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("name", "relevant"),
    [
        ("10-chat.yaml", True),
        ("chat.yaml", True),
        (".10-chat.yaml.swp", False),
        (".10-chat.yaml", False),
        ("10-chat.yaml~", False),
        ("10-chat.yaml.tmp", False),
        ("10-chat.yml", False),
        ("#10-chat.yaml#", False),
        ("4913", False),  # vim's write test file
    ],
)
def test_only_the_files_load_policy_set_reads_matter(name: str, relevant: bool) -> None:
    assert is_policy_file(name) is relevant


async def test_a_valid_change_is_swapped_in_and_recorded(folder: Path, node: FakeNode) -> None:
    clock = Clock()
    reloader = PolicyReloader(node, folder, watch=False, clock=clock)  # type: ignore[arg-type]
    before = reloader.live_digest
    assert (reloader.loaded_at, reloader.last_error) == (1000.0, None)
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    clock.now = 2000.0
    assert await reloader.reload() is True
    assert len(node.swaps) == 1
    assert reloader.live_digest == node.swaps[0].digest != before
    assert (reloader.reloads_ok, reloader.reloads_failed) == (1, 0)
    assert (reloader.loaded_at, reloader.last_error) == (2000.0, None)


async def test_an_invalid_set_keeps_the_last_good_one_and_logs_one_error_line(
    folder: Path, node: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    reloader = PolicyReloader(node, folder, watch=False, clock=clock)  # type: ignore[arg-type]
    before = reloader.live_digest
    (folder / "20-bad.yaml").write_text(
        'version: 1\nrules:\n  - channel: "a.{b}"\n    exchange: a\n    subscribe: [rol:x]\n'
    )
    clock.now = 2000.0
    with caplog.at_level(logging.INFO, logger="rabbitgate.audit"):
        assert await reloader.reload("SIGHUP") is False
    assert node.swaps == [] and reloader.live_digest == before
    assert (reloader.reloads_ok, reloader.reloads_failed) == (0, 1)
    assert reloader.loaded_at == 1000.0
    assert reloader.last_error is not None
    assert f"{folder / '20-bad.yaml'}:5: rule 1 (a.{{b}}): field 'subscribe'" in reloader.last_error
    [record] = caplog.records
    assert record.name == "rabbitgate.audit" and record.levelno == logging.ERROR
    text = record.getMessage()
    assert text.startswith("policy reload") and "\n" not in text
    assert reloader.last_error in text and before[:12] in text and "SIGHUP" in text

    (folder / "20-bad.yaml").unlink()
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    assert await reloader.reload() is True
    assert reloader.last_error is None and reloader.reloads_ok == 1


async def test_a_change_in_comments_only_swaps_nothing(
    folder: Path, node: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = PolicyReloader(node, folder, watch=False)  # type: ignore[arg-type]
    (folder / "10-chat.yaml").write_text("# a comment\n" + RULES.format(who="role:member"))
    with caplog.at_level(logging.INFO, logger="rabbitgate.audit"):
        assert await reloader.reload() is True
    assert node.swaps == [] and reloader.reloads_ok == 1
    assert caplog.records[0].getMessage().startswith("policy reload")


async def test_a_swap_the_broker_refuses_keeps_the_old_set(folder: Path, node: FakeNode) -> None:
    reloader = PolicyReloader(node, folder, watch=False)  # type: ignore[arg-type]
    before = reloader.live_digest
    node.fail = ConnectionError("broker gone")
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    assert await reloader.reload() is False
    assert reloader.live_digest == before and reloader.reloads_failed == 1
    assert reloader.last_error == "cannot put the new set in force: broker gone"


async def test_a_missing_folder_is_a_failed_reload(tmp_path: Path, node: FakeNode) -> None:
    reloader = PolicyReloader(node, tmp_path / "gone", watch=False)  # type: ignore[arg-type]
    assert await reloader.reload() is False
    assert (
        reloader.last_error is not None and "cannot read the policies folder" in reloader.last_error
    )


async def test_concurrent_reloads_run_one_at_a_time(folder: Path, node: FakeNode) -> None:
    reloader = PolicyReloader(node, folder, watch=False)  # type: ignore[arg-type]
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    results = await asyncio.gather(*(reloader.reload() for _ in range(5)))
    assert results == [True] * 5
    assert len(node.swaps) == 1  # the others found the same digest in force
    assert reloader.reloads_ok == 5


async def test_reload_soon_is_for_signal_handlers(folder: Path, node: FakeNode) -> None:
    reloader = PolicyReloader(node, folder, watch=False)  # type: ignore[arg-type]
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    assert await reloader.reload_soon() is True
    assert len(node.swaps) == 1


# --- the watcher --------------------------------------------------------------


async def test_the_watcher_reloads_a_file_written_in_place(
    watching: PolicyReloader, folder: Path, node: FakeNode
) -> None:
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    await until(lambda: len(node.swaps) == 1)
    assert "anyone" in str(node.swaps[0].rules[0].subscribe[0])


async def test_the_watcher_handles_temp_file_and_rename(
    watching: PolicyReloader, folder: Path, node: FakeNode
) -> None:
    temp = folder / ".10-chat.yaml.tmp1234"
    temp.write_text(RULES.format(who="scope:read"))
    os.replace(temp, folder / "10-chat.yaml")
    await until(lambda: len(node.swaps) == 1)
    assert str(node.swaps[0].rules[0].subscribe[0]) == "scope:read"


async def test_the_watcher_handles_rename_away_then_write_new(
    watching: PolicyReloader, folder: Path, node: FakeNode
) -> None:
    # vim without backupcopy: the original becomes the backup, a new file is written.
    os.replace(folder / "10-chat.yaml", folder / "10-chat.yaml~")
    (folder / "10-chat.yaml").write_text(RULES.format(who="scope:read"))
    await until(lambda: len(node.swaps) == 1)
    assert watching.reloads_failed == 0
    assert str(node.swaps[0].rules[0].subscribe[0]) == "scope:read"


async def test_the_watcher_ignores_files_that_are_not_policies(
    watching: PolicyReloader, folder: Path, node: FakeNode
) -> None:
    (folder / "notes.txt").write_text("x")
    (folder / ".10-chat.yaml.swp").write_text("x")
    (folder / "20-new.yaml.tmp").write_text("not: [valid")
    await asyncio.sleep(0.5)  # ten quiet windows: anything relevant would have reloaded
    assert watching.reloads_ok == watching.reloads_failed == 0
    # ... while a new policy file is noticed.
    (folder / "20-new.yaml").write_text("version: 1\nrules: []\n")
    await until(lambda: watching.reloads_ok == 1)


async def test_the_watcher_reports_an_invalid_file_and_recovers(
    watching: PolicyReloader, folder: Path, node: FakeNode
) -> None:
    before = watching.live_digest
    (folder / "10-chat.yaml").write_text("version: 1\nrules:\n  - channel: [\n")
    await until(lambda: watching.reloads_failed >= 1)
    assert watching.live_digest == before and node.swaps == []
    assert watching.last_error is not None and "10-chat.yaml" in watching.last_error
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    await until(lambda: len(node.swaps) == 1)
    assert watching.last_error is None


async def test_the_watcher_follows_a_replaced_folder(
    watching: PolicyReloader, folder: Path, node: FakeNode
) -> None:
    os.rename(folder, folder.with_name("old"))
    folder.mkdir()
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    await until(lambda: len(node.swaps) == 1)
    # ... and keeps watching the new folder.
    (folder / "10-chat.yaml").write_text(RULES.format(who="scope:x"))
    await until(lambda: len(node.swaps) == 2)


async def test_the_watcher_waits_for_a_removed_folder_to_come_back(
    folder: Path, node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.core.reloader.RETRY_SECONDS", 0.05)
    reloader = PolicyReloader(node, folder, quiet_ms=50)  # type: ignore[arg-type]
    await reloader.start()
    try:
        before = reloader.live_digest
        shutil.rmtree(folder)
        await until(lambda: reloader.reloads_failed == 1)
        assert reloader.live_digest == before
        assert reloader.last_error is not None and "cannot read the policies folder" in (
            reloader.last_error
        )
        await asyncio.sleep(0.5)  # several retries: each is a warning, not another failed reload
        assert reloader.reloads_failed == 1
        folder.mkdir()
        (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
        await until(lambda: len(node.swaps) == 1)
        assert reloader.last_error is None
    finally:
        await reloader.stop()


async def test_the_watcher_follows_a_kubernetes_configmap_update(tmp_path: Path) -> None:
    # A ConfigMap volume: files are symlinks through "..data", which kubelet swaps
    # atomically to a new timestamped folder; the file names never change.
    folder = tmp_path / "policies"
    (folder / "..v1").mkdir(parents=True)
    (folder / "..v1" / "10-chat.yaml").write_text(RULES.format(who="role:member"))
    (folder / "..data").symlink_to("..v1")
    (folder / "10-chat.yaml").symlink_to("..data/10-chat.yaml")
    node = FakeNode(load_policy_set(folder))
    reloader = PolicyReloader(node, folder, quiet_ms=50)  # type: ignore[arg-type]
    await reloader.start()
    try:
        (folder / "..v2").mkdir()
        (folder / "..v2" / "10-chat.yaml").write_text(RULES.format(who="anyone"))
        (folder / "..data_tmp").symlink_to("..v2")
        os.replace(folder / "..data_tmp", folder / "..data")
        await until(lambda: len(node.swaps) == 1)
        assert str(node.swaps[0].rules[0].subscribe[0]) == "anyone"
    finally:
        await reloader.stop()


async def test_stop_is_prompt_and_final(folder: Path, node: FakeNode) -> None:
    reloader = PolicyReloader(node, folder, quiet_ms=50)  # type: ignore[arg-type]
    await reloader.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await reloader.stop()
    assert loop.time() - started < 1.0
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    await asyncio.sleep(0.3)
    assert node.swaps == []


async def test_no_watcher_when_watching_is_disabled(folder: Path, node: FakeNode) -> None:
    reloader = PolicyReloader(node, folder, watch=False, quiet_ms=50)  # type: ignore[arg-type]
    await reloader.start()
    (folder / "10-chat.yaml").write_text(RULES.format(who="anyone"))
    await asyncio.sleep(0.3)
    assert node.swaps == []
    assert await reloader.reload() is True and len(node.swaps) == 1
    await reloader.stop()
