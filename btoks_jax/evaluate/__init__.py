"""Evaluation: retrieval metrics and the MMEB-V2 protocol (dataset map, row reader, scoring, reports)."""
