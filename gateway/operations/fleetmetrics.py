"""One Prometheus exposition from the workers' own: what the supervisor serves.

Why not prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR):
it covers only metrics kept in its mmap files, and half of a gateway's
metrics are read at scrape time by a custom collector (open connections,
send buffers, subscriptions, the broker connection, the policy set:
``gateway/metrics.py``), which that mode cannot carry. Each worker already
serves its whole registry on its admin socket, so the supervisor scrapes
them and merges the text: every sample gets a ``worker`` label (the index),
and families of the same name become one family, as Prometheus requires.
Sums over the fleet are PromQL's ``sum without (worker) (...)``.

A worker that does not answer a scrape is left out of it (its
``rabbitgate_worker_up`` is 0): its counters resume from where its process
left them, or from zero after a restart, which ``rate()`` handles.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LABEL = "worker"


def merge(expositions: Mapping[str, str], label: str = LABEL) -> list[Metric]:
    """The families of every exposition, each sample labelled ``label=<key>``."""
    families: dict[str, Metric] = {}
    for worker, text in expositions.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                labels = {label: worker, **sample.labels}
                merged.samples.append(
                    Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
                )
    return list(families.values())


def render(expositions: Mapping[str, str], own: str = "") -> bytes:
    """The merged exposition, then the supervisor's own metrics (``own``, text)."""
    registry = CollectorRegistry()
    registry.register(_Fixed(merge(expositions) + list(text_string_to_metric_families(own))))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
