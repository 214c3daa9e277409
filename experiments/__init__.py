"""Experiments run through qoq's real CLI, with their recorded results (see experiments/README.md)."""
