"""Data: the embedded emoji data set and MMEB-format files."""
