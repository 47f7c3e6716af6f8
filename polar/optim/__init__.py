"""Landing optimiser for PoLAR: pure kernels (:mod:`.landing`), the optimiser (:mod:`.optimizer`),
re-orthonormalisation (:mod:`.stabilize`) and Trainer integration (:mod:`.trainer`)."""

from .landing import landing_field, orthogonality_error
from .factory import make_optimizer
from .optimizer import LandingAdamW
from .stabilize import reorthonormalize

__all__ = ["LandingAdamW", "landing_field", "make_optimizer", "orthogonality_error", "reorthonormalize"]
