"""Miniature copies of the published MMEB-V2 evaluation files, in their exact schemas, for reader tests."""
