"""Read an engine's Prometheus ``/metrics`` text into samples you can query by name and labels.

vLLM names counters ``vllm:<name>_total``; ``MetricSamples.sum`` accepts the name
with or without the ``vllm:`` prefix and the ``_total`` suffix::

    samples = parse_prometheus_text(text)
    samples.sum("prompt_tokens_by_source", source="external_kv_transfer")
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r"\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


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


def _unescape(value: str) -> str:
    return value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_prometheus_text(text: str) -> MetricSamples:
    """Parse Prometheus text exposition format (comments and blank lines skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(match["labels"] or "")))
        samples.append(Sample(match["name"], labels, float(match["value"])))
    return MetricSamples(tuple(samples))
