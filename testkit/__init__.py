"""What the tests and the benchmarks share: a scriptable fake upstream and real server processes.

Kept out of `tests/` so `bench/` never imports the test suite (nor pytest).
"""
