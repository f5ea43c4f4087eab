"""Scoring windows as anomalies, the detection metrics, evaluation and its plots."""
