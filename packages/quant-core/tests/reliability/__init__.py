"""Reliability and security suite: bad checkpoints built from good tiny ones (``cases``), the table generated from
them (``table``, ``docs/reliability.md``), path-safety and untrusted-input tests, property-based tests, and
interrupted writes."""
