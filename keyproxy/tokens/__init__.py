"""Task tokens: short-lived, scoped tokens the broker issues and the proxy verifies."""

from keyproxy.tokens.tasks import (
    CLOCK_SKEW,
    EXCEPTION_ISSUER,
    TASK_TOKEN_TYPE,
    Revocations,
    TaskToken,
    TaskTokens,
    exception_subject,
    is_task_token,
)

__all__ = [
    "CLOCK_SKEW",
    "EXCEPTION_ISSUER",
    "TASK_TOKEN_TYPE",
    "Revocations",
    "TaskToken",
    "TaskTokens",
    "exception_subject",
    "is_task_token",
]
