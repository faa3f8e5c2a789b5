"""Load tools for rabbitgate: fan-out latency and CPU (``bench.load``), publish
throughput with confirms (``bench.publish``), concurrent connections
(``bench.connections``). Each starts its own gateway process on 127.0.0.1 and
reports what the README's "Performance" section shows. Benchmarks, not tests:
nothing here asserts on a time."""
