"""The agent layer, built on the engine's interface: external side effects and their
compensations (actions), reading the past (history), undoing committed work (undo),
retention, two-phase commit and the coordinator of atomic groups, and scopes."""
