"""The evaluator: accuracy, agreement, measured latency, size, MACs, reports."""
