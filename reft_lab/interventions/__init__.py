"""The intervention math, independent of any model.

Each variant is one file with one ``@register_intervention`` line; importing it here registers it as
a ReFT method of the same name (``method=<name>``).
"""

from reft_lab.interventions import direft, loreft, noreft  # noqa: F401  (registration)
from reft_lab.interventions.base import (
    INTERVENTIONS,
    Intervention,
    orthonormal_rows,
    register_intervention,
)

__all__ = ["INTERVENTIONS", "Intervention", "orthonormal_rows", "register_intervention"]
