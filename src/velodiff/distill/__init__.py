"""Trained compression: few-step students distilled from a teacher (``velodiff distill``)."""
