"""Topology configuration: YAML schema (pydantic), loader, runtime dataclasses."""

from __future__ import annotations

from pdx.config.loader import load_topology, parse_topology
from pdx.config.topology import Engine, RouterConfig, Topology

__all__ = ["Engine", "RouterConfig", "Topology", "load_topology", "parse_topology"]
