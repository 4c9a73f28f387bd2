"""The function of the parameters: Objective (model + loss + data), ParamSpace, losses, samples.

Everything above this layer sees a model only through an
:class:`~hesse.problem.objective.Objective`: its parameters
(:class:`~hesse.problem.params.ParamSpace`), its loss and the one loop over data.
"""
