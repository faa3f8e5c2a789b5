from gateway.transports.httplistener import OpenConnections


def test_open_connections_are_capped_per_address() -> None:
    open_ = OpenConnections(max_per_address=2)
    assert open_.enter("a") and open_.enter("a")
    assert not open_.enter("a") and open_.refused == 1
    assert open_.enter("b")
    open_.leave("a")
    assert open_.enter("a") and open_.held("a") == 2
    open_.leave("b")
    open_.leave("b")  # more leaves than enters: harmless
    assert open_.held("b") == 0
