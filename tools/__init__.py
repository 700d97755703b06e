"""Command-line tools: results aggregation and checks."""
