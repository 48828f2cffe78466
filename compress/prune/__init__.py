"""Channel pruning: channel groups and their removal, the measured latency table, NetAdapt's search."""
