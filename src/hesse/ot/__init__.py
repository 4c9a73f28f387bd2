"""Optimal-transport numerics (entropic OT solved by Sinkhorn and sparse Newton steps); imports nothing of hesse."""
