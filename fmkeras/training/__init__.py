"""Training utilities shared by every task: optimizer, callbacks, run directories."""
