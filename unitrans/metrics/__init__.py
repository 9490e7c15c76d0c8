"""Evaluation metrics: pure functions of scores and ground truth (numpy only, no torch)."""
