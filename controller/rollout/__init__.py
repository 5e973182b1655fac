"""Staged rollouts: waves, health gates, automatic rollback."""
