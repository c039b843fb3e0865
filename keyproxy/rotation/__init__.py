"""Key rotation: the journal's types (`state`, pure), the rotator back-ends (`rotators`), the
rotation engine (`engine`) and the key status report (`status`)."""

from keyproxy.rotation.engine import (
    FAILPOINT_ENV,
    Outcome,
    RotationError,
    Rotations,
    journal_path,
    key_created,
    run_scheduler,
)

__all__ = [
    "FAILPOINT_ENV",
    "Outcome",
    "RotationError",
    "Rotations",
    "journal_path",
    "key_created",
    "run_scheduler",
]
