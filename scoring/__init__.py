"""Pure scoring library (no I/O): compares an annotation with gold, a correction or a peer.

Implements docs/metrics.md; filled in by the scoring engine work.
"""
