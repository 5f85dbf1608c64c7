"""Read an engine's Prometheus ``/metrics`` text into samples you can query by name and labels.

vLLM names counters ``vllm:<name>_total``; ``MetricSamples.sum`` accepts the name
with or without the ``vllm:`` prefix and the ``_total`` suffix::

    samples = parse_prometheus_text(text)
    samples.sum("prompt_tokens_by_source", source="external_kv_transfer")
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs
    value: float


@dataclass(frozen=True)
class MetricSamples:
    samples: tuple[Sample, ...]

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples named ``name`` (``vllm:`` prefix and ``_total`` suffix optional) whose
        labels include ``labels``."""
        names = {name, f"{name}_total"}
        if not name.startswith("vllm:"):
            names |= {f"vllm:{n}" for n in names}
        wanted = set(labels.items())
        return [s for s in self.samples if s.name in names and wanted <= set(s.labels)]

    def sum(self, name: str, **labels: str) -> float:
        """Sum over matching samples (0.0 if none: counters start absent)."""
        return math.fsum(s.value for s in self.find(name, **labels))

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def parse_prometheus_text(text: str) -> MetricSamples:
    """Parse Prometheus text exposition format with ``prometheus_client``'s parser.

    Every sample is kept under its exposed name: a counter ``x`` gives ``x_total``
    and, from prometheus_client exporters such as vLLM, ``x_created`` (a Unix
    timestamp, never a count); exemplars and timestamps are dropped. Raises
    ``ValueError`` naming the bad line.
    """
    from prometheus_client.parser import text_string_to_metric_families  # not at `import pdx`

    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ValueError(f"not a Prometheus sample line ({exc}): {_first_bad_line(text)!r}") from exc
    samples = [
        Sample(s.name, tuple(sorted(s.labels.items())), float(s.value)) for fam in families for s in fam.samples
    ]
    return MetricSamples(tuple(samples))


def _first_bad_line(text: str) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                list(text_string_to_metric_families(line + "\n"))
            except ValueError:
                return line[:200]
    return text[:200]
