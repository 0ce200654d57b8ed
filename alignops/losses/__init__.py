"""The loss catalog on log-probs (the math of every family: docs/losses.md).

Every loss is a short function of per-sequence (or per-token) log-probs, so cached
reference log-probs plug in unchanged. Each returns ``LossOutput(loss, losses, metrics)``:
the reduced loss, the per-example losses and the metrics people log.
"""

from ._common import LossOutput
from .binary import *  # noqa: F401,F403
from .distill import *  # noqa: F401,F403
from .dpo import *  # noqa: F401,F403
from .listwise import *  # noqa: F401,F403
from .negative import *  # noqa: F401,F403
from .online import *  # noqa: F401,F403
from .policy import *  # noqa: F401,F403
from .reference_free import *  # noqa: F401,F403
from .reward import *  # noqa: F401,F403

__all__ = ["LossOutput"]  # extended below with every module's own __all__
for _m in (binary, dpo, listwise, negative, online, policy, reference_free, reward, distill):  # noqa: F405
    __all__ += list(_m.__all__)
del _m
