from gateway.core.hub import Hub


def test_hub_tracks_subscribers_and_exchanges() -> None:
    hub: Hub[str] = Hub()
    assert hub.add("chat.a", "chat", "s1") is True
    assert hub.add("chat.a", "chat", "s2") is False
    assert hub.add("chat.b", "chat", "s1") is False
    assert hub.add("feed.x", "feeds", "s1") is True
    assert set(hub.subscribers("chat.a")) == {"s1", "s2"}
    assert hub.exchanges() == {"chat", "feeds"}
    assert hub.remove("chat.a", "s1") is None
    assert hub.remove("chat.a", "s1") is None  # twice is harmless
    assert hub.remove("chat.a", "s2") is None  # chat.b still uses "chat"
    assert hub.remove("chat.b", "s1") == "chat"
    assert hub.exchanges() == {"feeds"}
    assert list(hub.subscribers("chat.a")) == []
    assert len(hub) == 1


def test_subscribers_are_found_by_exchange_and_channel() -> None:
    """issue 13 item 5: a routing key published to another exchange must not
    reach the channel's subscribers."""
    hub: Hub[str] = Hub()
    hub.add("user.bob.inbox", "notify", "bob")
    assert list(hub.subscribers("user.bob.inbox", "demo")) == []
    assert list(hub.subscribers("user.bob.inbox", "notify")) == ["bob"]
    # After a reload moved the channel: both routes, each with its own.
    hub.add("user.bob.inbox", "inbox2", "bob2")
    assert set(hub.subscribers("user.bob.inbox")) == {"bob", "bob2"}
    assert hub.remove("user.bob.inbox", "bob") == "notify"
    assert hub.remove("user.bob.inbox", "bob2") == "inbox2"
    assert hub.channels() == [] and len(hub) == 0
