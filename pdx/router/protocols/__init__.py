"""The three PD protocols the router speaks, as pure body-rewriting functions.

==========  ==========================  ==========================================
protocol    fleet                       dispatch
==========  ==========================  ==========================================
``pdx``     vLLM + PdxConnector         P and D concurrently, one shared transfer id
``nixl``    vLLM + stock NixlConnector  P (max_tokens=1) first, then D with P's params
``sglang``  stock SGLang PD             P and D concurrently, shared bootstrap room
==========  ==========================  ==========================================

Each module builds the leg bodies from the client's parsed JSON body (a dict it
never mutates); ``pdx.router.proxy`` does the I/O.
"""

from __future__ import annotations

CONCURRENT = frozenset({"pdx", "sglang"})  # protocols that dispatch both legs at once
