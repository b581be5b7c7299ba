"""The list of every transform factory of ``saft_jax.optim`` (by name)."""
from saft_jax.optim._averaging import swa, wa_sam
from saft_jax.optim._cheap import looksam, msam, sam_every_k
from saft_jax.optim._perturb_random import rwp
from saft_jax.optim._sam import asam, sam
from saft_jax.optim._sparse import ssam_d, ssam_f
from saft_jax.optim._variants import friendly_sam, gsam, pgn, sagm

TRANSFORMS = {
    "sam": sam,
    "asam": asam,
    "friendly_sam": friendly_sam,
    "gsam": gsam,
    "sagm": sagm,
    "pgn": pgn,
    "ssam_f": ssam_f,
    "ssam_d": ssam_d,
    "rwp": rwp,
    "swa": swa,
    "wa_sam": wa_sam,
    "looksam": looksam,
    "msam": msam,
    "sam_every_k": sam_every_k,
}
"""name -> factory ``f(base_optimizer, ...) -> GradientTransformationExtraArgs``."""
