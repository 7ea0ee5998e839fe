"""The wait before a retry, for all that retries in capd: model calls, report delivery."""

import random

CAP_S = 30.0


def backoff_s(attempt: int, base_s: float, cap_s: float = CAP_S) -> float:
    """Exponential backoff with jitter: `base_s` before the first retry, doubling each time
    up to `cap_s`, then stretched by up to a quarter at random so retries spread out."""
    return min(cap_s, base_s * 2 ** (attempt - 1)) * random.uniform(1, 1.25)
