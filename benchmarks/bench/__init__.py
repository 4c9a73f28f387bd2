"""Side-by-side benchmarks of hesse against PyHessian, hessian-eigenthings and curvlinops.

Run ``python -m bench`` from ``benchmarks/`` (``make bench``); ``--quick`` is a smoke run.
"""
