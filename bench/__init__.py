"""The benchmarks (`make bench`): relay.py, negotiations.py, and what they share (common.py)."""
