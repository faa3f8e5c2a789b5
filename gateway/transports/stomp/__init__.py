"""STOMP 1.2 (1.1, 1.0) on the /ws endpoint, for Web-STOMP and stompjs applications.

frames (bytes <-> frames, pure) -> mapping (frames <-> the gateway's requests
and answers, pure) -> bridge (one conversation's state, pure) -> endpoint
(the I/O: CONNECT, admission, the read loop, heart-beats).
"""
