"""Quality-vs-speed evaluation harness."""
