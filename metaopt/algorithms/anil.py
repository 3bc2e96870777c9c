"""ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse?"): adapt only the head.

ANIL is MAML whose inner loop adapts only the head's parameters (``inner_params``);
the body is still meta-learned, through the head's adaptation. This class only
chooses those parameters: ``ANIL(model, head="head")`` for a model whose head
parameters are named ``head.*``, or ``ANIL(seq, head=1)`` for the last child of an
``nn.Sequential``.
"""

from __future__ import annotations

from torch import nn

from metaopt.algorithms.maml import MAML

__all__ = ["ANIL", "head_parameters"]


def head_parameters(model: nn.Module, head: int | str) -> list[str]:
    """Names of the head's parameters: under the prefix ``head`` (a str), or of the last
    ``head`` children of an ``nn.Sequential`` (an int)."""
    if isinstance(head, str):
        names = [n for n, _ in model.named_parameters() if n.startswith(head + ".")]
        if not names:
            raise ValueError(f"{type(model).__name__} has no parameters under '{head}.' "
                             f"(its parameters: {[n for n, _ in model.named_parameters()]})")
        return names
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"ANIL(head=int) needs an nn.Sequential (body..., head), got "
                        f"{type(model).__name__}; give head='name' of the head module")
    if isinstance(head, bool) or not isinstance(head, int) or not 1 <= head < len(model):
        raise ValueError(f"head must be between 1 and {len(model) - 1} trailing "
                         f"children of the model, got {head!r}")
    # Slices of an nn.Sequential keep their children's names ("3.weight").
    names = [n for n, _ in model[len(model) - head:].named_parameters()]
    if not names:
        raise ValueError("the head has no parameters to adapt")
    return names


class ANIL(MAML):
    """MAML with the inner loop on the head only.

    Args:
        model: the network.
        head: the head: a parameter-name prefix (``"head"``) or, for an
            ``nn.Sequential``, how many trailing children (default 1).
        Other arguments as for :class:`MAML`.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 1,
                 first_order: bool = False, *, head: int | str = 1, **kwargs) -> None:
        if "inner_params" in kwargs:
            raise TypeError("ANIL adapts the head; inner_params is not an ANIL argument")
        self_head = head_parameters(model, head)
        super().__init__(model, inner_lr, inner_steps, first_order, inner_params=self_head,
                         **kwargs)
        self.head_names = list(self.inner_params)
