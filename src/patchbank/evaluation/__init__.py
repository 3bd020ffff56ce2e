"""Metrics (official MVTec protocol), map <-> image geometry, figures."""
