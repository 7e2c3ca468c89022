"""Side-by-side speed measurements: each prints ratios of implementations timed in the same run."""
