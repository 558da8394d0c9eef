"""Scoring answers against references: sampled products, predictions files, failure views."""
