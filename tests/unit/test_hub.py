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
