"""Tensor names inside a part: `emb/<table>/weight`, `emb/<table>/opt/<state>`, `emb/<table>/ids`.

The one place that spells them; the writer (the checkpointer's snapshot), the storage checks and row
composition all use these.
"""


def weight_name(table: str) -> str:
    return f"emb/{table}/weight"


def state_name(table: str, state: str) -> str:
    return f"emb/{table}/opt/{state}"


def ids_name(table: str) -> str:
    """A subset part's row ids of `table`, relative to the first row the part's domain holds."""
    return f"emb/{table}/ids"


# A policy's state tensors in the dense part of a full save: `policy/<key>`.
POLICY_PREFIX = "policy/"
