"""pdx's vLLM adapter: ``PdxConnector`` (``kv_connector_module_path: pdx.engines.vllm``).

Importing this package imports vLLM; the rest of pdx never does.
"""

from pdx.engines.vllm.connector import PdxConnector

__all__ = ["PdxConnector"]
