r"""Influence functions, unlearning, hypergradients and attribution scored against retraining.

- :func:`influence`: how removing each training point changes each query's loss.
- :func:`lds`, :func:`mislabel_auc`, :func:`retrain_subsets`: attribution scored against
  retraining (the linear datamodeling score, mislabel detection, their ground truth).
- :func:`unlearn`: a model with a forget set removed (a Newton step, the influence removal
  step, or IAU's gradient step).
- :func:`hypergradient`: the gradient of a validation loss with respect to regularization
  hyperparameters, by the implicit function theorem.

**The convention of every score in hesse** (stated here once). For a training objective that
is the weighted MEAN loss :math:`L = \frac1W \sum_i w_i \ell_i` of an :class:`~hesse.Objective`
(plus, optionally, weight decay :math:`\frac{\lambda}{2}\|\theta\|^2`, which ``damping=λ``
accounts for exactly),

.. math::
    \mathrm{scores}[q, i] = \frac{w_i}{W}\, \nabla L_q(\hat\theta)^\top
        (H + \lambda I)^{-1} \nabla \ell_i(\hat\theta)
    \;\approx\; L_q(\hat\theta_{-i}) - L_q(\hat\theta),

the predicted change of query :math:`q`'s LOSS when training point :math:`i` is REMOVED (its
term :math:`w_i \ell_i / W` dropped from the objective, the model retrained). :math:`\ell_i`
is the mean loss of sample :math:`i` alone and :math:`w_i` what the objective weighs it by: 1
for a plain mean over samples (then :math:`w_i / W = 1/n`), its counted tokens (targets not
``ignore_index``: a sequence's score is the sum over its counted tokens), or the sum of its
class weights; :math:`W = \sum_i w_i`. A sample whose targets are all ignored has scores 0.
Positive: the point helps the query (removing it raises the query's loss); negative: it
harms it.

**Sequences** (a Hugging Face LM's own loss, or any token loss): the objective is the mean
over ALL counted training tokens, so a training sequence enters with
:math:`w_i \ell_i = \sum_t \ell_{i,t}`: its score is the SUM of its tokens' scores
(``influence(per_token=True)`` returns them, ``result.token_scores[q, i, t]``, summing over
``t`` to ``scores[q, i]``), and long sequences weigh more. The query side is the query's MEAN
token loss :math:`L_q` (its own mean loss), so a query's row does not grow with its length.
kronfluence's LM examples sum the token losses of both (its training gradient is hesse's
:math:`\nabla s_i`, its measurement :math:`T_q L_q`, :math:`T_q` the query's counted
tokens): with the same curvature matrix and damping, multiply its scores by
:math:`1/(T_q W)` instead of :math:`1/n`.

``ihvp="projected"`` replaces :math:`(H+\lambda I)^{-1}` by
:math:`P^\top(PHP^\top + \lambda I_k)^{-1}P`; ``"kfac"``/``"ekfac"`` by the inverse of the
damped Kronecker factors.

To compare with a peer, multiply the PEER's score by (plain mean over :math:`n` samples;
:math:`p_q` the query's probability of its label; :math:`\ell = \log(1 + e^{-m})` for the
margin :math:`m = z_y - \operatorname{logsumexp}_{c \ne y} z_c`, so
:math:`\nabla \ell = -(1 - p)\nabla m`):

- Koh & Liang's :math:`\mathcal{I}_{up,loss}`: :math:`-1/n`.
- kronfluence (pairwise scores, same damping: its ``damping_factor`` is added to the
  eigenvalues of mean-loss factors): :math:`1/n` with ``compute_measurement`` = the query's
  loss; :math:`(1 - p_q)/n` with its classification examples' measurement, MINUS the margin
  (``-margins.sum()``); :math:`-(1 - p_q)/n` with the margin itself (what
  ``benchmarks/attribution`` passes).
- TRAK (traker, and dattri's ``TRAKAttributor``): :math:`(1 - p_q)` for one checkpoint, with
  the curvature the projected Gauss-Newton of the margin (:math:`\Phi^\top\Phi`, rows
  :math:`P\nabla m_i`) in place of hesse's projected Fisher of the loss, and its
  ``lambda_reg`` equal to :math:`n\lambda`; a positive factor: the same sign.
- dattri's influence-function attributors (``IFAttributor*``, a mean loss, the full training
  set in one batch): :math:`1/n`, transposed (dattri returns ``(n_train, n_query)``), with
  ``regularization`` = :math:`\lambda`; TracIn: a positive factor, no inverse.
- captum's ``NaiveInfluenceFunction`` at full rank: :math:`1` when its ``hessian_reg`` is
  :math:`n\lambda` (measured in ``benchmarks/influence``).

``benchmarks/attribution`` measures each sign on three workloads; LDS and AUC are blind to
positive per-query factors, not to sign.
"""

from ._ihvp import InverseDiagnostics
from ._result import InfluenceResult, TopInfluences
from ._tokens import TOKEN_TASKS
from .datamodels import GroundTruth, Interval, LDSResult, lds, mislabel_auc, retrain_subsets
from .hyper import HypergradientResult, hypergradient
from .scores import INFLUENCE_METHODS as IHVP_METHODS
from .scores import influence
from .unlearning import UnlearnResult, unlearn

__all__ = [
    "influence",
    "lds",
    "mislabel_auc",
    "retrain_subsets",
    "GroundTruth",
    "LDSResult",
    "Interval",
    "unlearn",
    "hypergradient",
    "InfluenceResult",
    "TopInfluences",
    "UnlearnResult",
    "HypergradientResult",
    "InverseDiagnostics",
    "IHVP_METHODS",
    "TOKEN_TASKS",
]
