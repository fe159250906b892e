"""Benchmarking: tasks, splits, metrics, leaderboards (not yet implemented)."""
