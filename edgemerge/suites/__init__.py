"""Real multi-task suites for the demo and the accuracy benchmark (models and data from packages)."""
