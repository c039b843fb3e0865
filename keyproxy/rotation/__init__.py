"""Key rotation: the journal's types (`state`, pure), the rotator back-ends (`rotators`), the
journal in Vault (`journal`), the steps of a rotation (`steps`), the engine that runs them
(`engine`), and the key status report (`status`)."""

from keyproxy.rotation.engine import Rotations, key_created, run_scheduler
from keyproxy.rotation.journal import FAILPOINT_ENV, RotationError, journal_path
from keyproxy.rotation.steps import Outcome

__all__ = [
    "FAILPOINT_ENV",
    "Outcome",
    "RotationError",
    "Rotations",
    "journal_path",
    "key_created",
    "run_scheduler",
]
