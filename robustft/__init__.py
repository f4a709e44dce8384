"""robustft."""
