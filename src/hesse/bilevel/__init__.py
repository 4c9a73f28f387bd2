"""Bilevel optimisation on Hessian-vector products (hypergradients without inverting)."""
