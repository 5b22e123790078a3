"""walstore for LangGraph: a checkpointer and a long-term memory store in one walstore store.

::

    import walstore
    from walstore.integrations.langgraph import WalstoreSaver, WalstoreStore

    store = walstore.open("agent-state")
    saver = WalstoreSaver(store)
    graph = builder.compile(checkpointer=saver, store=WalstoreStore(store))
    graph.invoke(inputs, {"configurable": {"thread_id": "t1"}})
    old_state = list(graph.get_state_history({"configurable": {"thread_id": "t1"}}))[-2]
    saver.rewind(old_state.config)        # rewind thread t1 only, with compensations

This package owns the integration; its parts:

- ``keys.py``: the key schema (every key of one thread under one prefix: its scope);
- ``blobs.py``: the blob codec (values once per channel version, list deltas, zlib);
- ``serde.py``: the type policy of the default serializer (the graph's own types come
  back as themselves; what would not is refused at ``put``; nothing pickles);
- ``saver.py``: ``WalstoreSaver`` (fencing, one-thread rewind, erasure, DeltaChannel
  history) and the scope provider that makes a transaction begun in a graph node belong
  to its thread;
- ``store.py``: ``WalstoreStore``, LangGraph's ``BaseStore`` (long-term memory, TTL).
"""
from .saver import ResumeUndo, StaleCheckpointError, WalstoreSaver
from .serde import StateSerializer, StateTypeError
from .store import WalstoreStore

__all__ = ["WalstoreSaver", "StaleCheckpointError", "ResumeUndo", "WalstoreStore",
           "StateSerializer", "StateTypeError"]
