"""OOD scoring, metrics and evaluation reports."""
