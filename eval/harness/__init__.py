"""The harness: spec parsing, generation, metrics, report, and the `accel-eval` command line."""
