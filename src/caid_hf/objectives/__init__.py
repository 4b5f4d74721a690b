"""Instance-discrimination objectives, one module per method, chosen from a registry:
``moco.py`` (MoCo-v2), ``barlow_twins.py`` and ``simsiam.py``. Each implements the
:class:`~.common.Objective` interface (its loss from the query features and the key view,
its run checks, what to do after loading, its parameter groups)."""

from __future__ import annotations

from .barlow_twins import BarlowTwins
from .common import Objective, ObjectiveOutput, embedding_std, global_pool, projection_head
from .moco import MoCoV2
from .simsiam import SimSiam

OBJECTIVES: dict[str, type[Objective]] = {
    "moco_v2": MoCoV2,
    "barlow_twins": BarlowTwins,
    "simsiam": SimSiam,
}

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "embedding_std", "global_pool",
           "objective_class", "projection_head"]


def objective_class(method: str) -> type[Objective]:
    """The objective of ``discrimination_method`` ``method``."""
    try:
        return OBJECTIVES[method]
    except KeyError:
        raise ValueError(f"discrimination_method={method!r} is unknown; expected one of "
                         f"{', '.join(OBJECTIVES)}") from None
