"""What ``analyze`` computes and how much it may spend: :class:`Options`."""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("eigs", "trace", "density", "layers", "ggn", "kfac")
CURVATURES = ("hessian", "ggn", "fisher", "kfac", "ekfac")
KRONECKER = ("kfac", "ekfac")
"""Curvatures built from Kronecker factors; the ``kfac`` section measures them against the GGN."""


@dataclass(frozen=True)
class Options:
    """What ``analyze`` computes and how much it may spend.

    Attributes:
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` (Monte-Carlo "true" Fisher),
            ``"kfac"`` or ``"ekfac"`` (``hesse.KFACOperator`` / ``hesse.EKFACOperator`` of the
            GGN, ``kind="exact"``, ``approx="expand"``: the sections describe that matrix,
            its trace comes from the factors).
        sections: which of ``SECTIONS`` to compute (outliers and stability follow from them).
            ``ggn`` applies to the Hessian only, ``kfac`` (the gap to the exact GGN,
            ``hesse.curvature_gap``) to a Kronecker curvature only.
        k: number of largest eigenvalues.
        k_smallest: number of smallest (most negative) eigenvalues.
        budget: products per estimate: each eigenvalue run, the trace, the block traces.
        steps: Lanczos steps per probe of the spectral density.
        probes: probes of the spectral density.
        seed: seed of every random probe and start vector.
    """

    curvature: str = "hessian"
    sections: tuple[str, ...] = SECTIONS
    k: int = 20
    k_smallest: int = 5
    budget: int = 100
    steps: int = 80
    probes: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise ValueError(
                f"analyze: curvature={self.curvature!r} is not one of {', '.join(CURVATURES)}."
            )
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ValueError(f"analyze: unknown sections {unknown}; choose from {SECTIONS}.")
        counts = {
            "k": self.k,
            "k_smallest": self.k_smallest,
            "steps": self.steps,
            "probes": self.probes,
        }
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"analyze: {name} must be at least 1, got {value}.")

    def check(self, dim: int) -> None:
        """Check the eigenvalue counts against ``dim`` parameters, then the budget against them.

        Raises:
            ValueError: more eigenvalues than parameters, or a budget below ``2k`` products.
        """
        sizes = self._lanczos_sizes()
        if sizes and max(sizes) > dim:
            raise ValueError(
                f"analyze: k={max(sizes)} eigenvalues asked for, but only {dim} parameters are "
                f"analysed (a {dim}x{dim} curvature matrix); pass k <= {dim}."
            )
        need = max([4] + [2 * k for k in sizes])
        if self.budget < need:
            raise ValueError(
                f"analyze: budget={self.budget} products is too small for k={self.k}: Lanczos "
                f"needs about 2k products and the trace at least 4; pass budget >= {need}."
            )

    def _lanczos_sizes(self) -> list[int]:
        """Numbers of eigenvalues the chosen sections ask Lanczos for."""
        top = {"eigs", "ggn"} | ({"kfac"} if self.curvature in KRONECKER else set())
        sizes = [self.k] if top & set(self.sections) else []
        return sizes + ([self.k_smallest] if "eigs" in self.sections else [])
