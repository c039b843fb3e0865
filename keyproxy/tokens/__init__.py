"""Task tokens: short-lived, scoped tokens the broker issues and the proxy verifies.

`tasks.TaskTokens` is the whole service, built in layers: the revocation list and its store
(`revocation`), the exception register (`exceptions`), the signing keys and issuing
(`signing`), and verifying (`verify`). The token's format is in `format`.
"""

from keyproxy.config import EXCEPTION_ISSUER
from keyproxy.tokens.format import (
    CLOCK_SKEW,
    LEEWAY,
    TASK_TOKEN_TYPE,
    CertificateBinding,
    Link,
    TaskToken,
    exception_problem,
    exception_subject,
    exception_subject_named,
    is_task_token,
    needs_shared_store,
)
from keyproxy.tokens.revocation import END_REASONS, HOLDER_REASONS, chain_fields
from keyproxy.tokens.revoked import Revocations
from keyproxy.tokens.tasks import TaskTokens

__all__ = [
    "CLOCK_SKEW",
    "END_REASONS",
    "EXCEPTION_ISSUER",
    "HOLDER_REASONS",
    "LEEWAY",
    "TASK_TOKEN_TYPE",
    "CertificateBinding",
    "Link",
    "Revocations",
    "TaskToken",
    "TaskTokens",
    "chain_fields",
    "exception_problem",
    "exception_subject",
    "exception_subject_named",
    "is_task_token",
    "needs_shared_store",
]
