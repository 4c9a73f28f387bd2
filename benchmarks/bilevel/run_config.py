"""Step sizes and budgets of the bilevel benchmark, shared by run.py and peer_torchopt.py."""

CONFIG: dict = {
    "checkpoints": 8,
    "cleaning": {
        "batch": 100,
        "implicit": {
            "lr": 1000.0,
            "inner_lr": 1.0,
            "inner_steps": 20,
            "max_matvecs": 20,
            "tol": 1e-4,
            "steps": 60,
        },
        "bsvr": {"lr": 100.0, "inner_lr": 1.0, "beta": 0.5, "beta_x": 0.5, "steps": 1500},
        "lvhba": {
            "lr": 1.0,
            "x_lr": 1000.0,
            "theta_lr": 1.0,
            "c": 1.0,
            "gamma1": 10.0,
            "steps": 1500,
        },
    },
    "decay": {
        "batch": 50,
        "implicit": {
            "lr": 10.0,
            "inner_lr": 1.0,
            "inner_steps": 20,
            "max_matvecs": 30,
            "tol": 1e-6,
            "steps": 60,
            "x_shift": 2.0,
        },
        "bsvr": {
            "lr": 0.5,
            "inner_lr": 1.0,
            "beta": 0.5,
            "beta_x": 0.5,
            "steps": 1500,
            "x_shift": 2.0,
        },
        "lvhba": {
            "lr": 1.0,
            "theta_lr": 1.0,
            "c": 1.0,
            "gamma1": 10.0,
            "steps": 1500,
            "x_shift": 2.0,
        },
    },
}
"""Per problem: the mini-batch of the stochastic methods and each method's options and steps;
``x_shift`` moves the start of the hyperparameters (decay: from log-decay -4 to -2, where the
model is over-regularized)."""
