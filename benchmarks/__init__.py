"""Op benchmarks: python -m benchmarks.run; README tables: python -m benchmarks.report."""
