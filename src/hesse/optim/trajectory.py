"""SAF's trajectory loss: sharpness-aware training for free, from outputs of earlier epochs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TrajectoryLoss:
    r"""SAF's trajectory loss: a KL term to each sample's outputs ``lag`` epochs ago.

    It replaces SAM's second forward-backward pass (Du, Zhou, Feng, Tan & Zhang 2022,
    "Sharpness-Aware Training for Free"):

    .. math::
        L_{tra} = \frac{\lambda\,\tau^2}{|B|} \sum_{i \in B}
        \mathrm{KL}\big(\mathrm{softmax}(\hat y_i^{(e - \tilde E)} / \tau)\,\big\|\,
        \mathrm{softmax}(f(x_i) / \tau)\big)

    where :math:`\hat y_i^{(e-\tilde E)}` are the logits the model gave sample ``i`` in epoch
    :math:`e - \tilde E` (stored here; ``lag`` = :math:`\tilde E`). The penalty is zero for a
    sample until it has outputs from ``lag`` epochs back. The factor :math:`\tau^2` keeps the
    gradient's scale independent of the temperature (as in distillation).

    The outputs of epoch :math:`e` go to a slot of their own, apart from those of epoch
    :math:`e - \tilde E` that the penalty reads (a ring of :math:`\tilde E + 1` epochs, as
    in the official code), so a sample seen twice in one epoch — drawn with replacement, or
    by SAM's two closure calls — is compared with epoch :math:`e - \tilde E` both times.
    Epoch :math:`e`'s record of a sample is its first output in that epoch (for SAM, the one
    at the unperturbed weights). Memory: ``(lag + 1) * n_samples * n_outputs`` numbers.

    Args:
        n_samples: Samples in the training set (indices ``0 .. n_samples - 1``).
        n_outputs: Logits per sample.
        lag: :math:`\tilde E`, in epochs (``>= 1``).
        temperature: :math:`\tau`.
        weight: :math:`\lambda`.

    Example:
        >>> traj = TrajectoryLoss(4, 3, lag=1)
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> traj(logits, torch.arange(4), epoch=0).item()  # nothing stored yet
        0.0
        >>> traj(logits, torch.arange(4), epoch=1).item()  # same outputs as one epoch ago
        0.0
    """

    def __init__(
        self,
        n_samples: int,
        n_outputs: int,
        *,
        lag: int = 3,
        temperature: float = 1.0,
        weight: float = 1.0,
    ):
        if lag < 1 or not temperature > 0:
            raise ValueError(
                f"TrajectoryLoss: need lag >= 1 and temperature > 0, got lag={lag}, "
                f"temperature={temperature}."
            )
        self.lag, self.temperature, self.weight = int(lag), float(temperature), float(weight)
        self.outputs = torch.zeros(self.lag + 1, n_samples, n_outputs)
        self.epoch_of = torch.full((self.lag + 1, n_samples), -self.lag - 1, dtype=torch.long)

    def __call__(self, logits: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """The penalty for this batch; its outputs are kept for epoch ``epoch + lag``.

        Args:
            logits: ``(B, n_outputs)`` outputs of the samples ``index``.
            index: ``(B,)`` sample indices.
            epoch: The current epoch (0-based).

        Returns:
            A scalar tensor (differentiable in ``logits``).
        """
        if logits.shape != (len(index), self.outputs.shape[2]):
            raise ValueError(
                f"TrajectoryLoss: expected logits of shape ({len(index)}, "
                f"{self.outputs.shape[2]}), got {tuple(logits.shape)}."
            )
        if epoch < 0:
            raise ValueError(f"TrajectoryLoss: epoch must be >= 0, got {epoch}.")
        index = index.cpu()
        read, write = (epoch - self.lag) % (self.lag + 1), epoch % (self.lag + 1)
        past = self.outputs[read, index].to(logits)
        known = (self.epoch_of[read, index] == epoch - self.lag).to(logits)
        first = self.epoch_of[write, index] != epoch
        self.outputs[write, index[first]] = logits.detach().float().cpu()[first]
        self.epoch_of[write, index[first]] = epoch
        tau = self.temperature
        kl = F.kl_div(
            F.log_softmax(logits / tau, -1),
            F.log_softmax(past / tau, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        return self.weight * tau**2 * (kl * known).sum() / len(index)

    def state_dict(self) -> dict:
        """The stored outputs and the epochs they come from."""
        return {"outputs": self.outputs.clone(), "epoch_of": self.epoch_of.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: the stored outputs have another shape than this loss keeps.
        """
        if state["outputs"].shape != self.outputs.shape:
            raise ValueError(
                f"TrajectoryLoss.load_state_dict: expected outputs of shape "
                f"{tuple(self.outputs.shape)} (lag + 1 epochs, n_samples, n_outputs), got "
                f"{tuple(state['outputs'].shape)}; load a state saved by a TrajectoryLoss with "
                "the same n_samples, n_outputs and lag."
            )
        self.outputs, self.epoch_of = state["outputs"].clone(), state["epoch_of"].clone()
