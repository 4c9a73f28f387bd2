"""Loss functions whose curvature with respect to the outputs is known in closed form."""
