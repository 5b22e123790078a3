"""The engine: the one commit pipeline, the only LMDB writer, snapshots, conflicts,
recovery, transactions.  See Engine (walstore.engine.engine) for how the parts fit."""
