"""Evaluation: metrics, ShapesEval, benchmarks and reports."""
