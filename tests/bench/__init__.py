"""The benchmarks' own code (bench/): it starts, and its arithmetic is right."""
