"""The PoLAR optimiser: the Stiefel manifold (:mod:`.stiefel`), the landing field (:mod:`.landing`), the modes
(:mod:`.modes`, ablations in :mod:`.ablations`), the executors (:mod:`.executors`), the optimiser
(:mod:`.optimizer`), re-orthonormalisation (:mod:`.stabilize`), row shards (:mod:`.sharding`), the model-facing
factory (:mod:`.factory`) and Trainer integration (:mod:`.trainer`)."""

from . import ablations  # noqa: F401  (registers the penalty / euclidean modes and the safe step)
from .factory import make_optimizer, reorthonormalize
from .guard import NonFiniteStepError
from .landing import landing_field
from .optimizer import LandingAdamW
from .stiefel import orthogonality_error

__all__ = ["LandingAdamW", "NonFiniteStepError", "landing_field", "make_optimizer", "orthogonality_error",
           "reorthonormalize"]
