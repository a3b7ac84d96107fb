"""Rate limiting: a token bucket per connection, and flood detection on top of it."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each action takes one.

    ``flooding`` turns true when, over the last second, the client asked for
    ``flood_factor`` times its rate: such a client is disconnected. A rate of 0
    turns the limit off.
    """

    def __init__(self, rate: float, burst: int, flood_factor: float = 10.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp: float | None = None
        self.flood_limit = rate * flood_factor
        self.window_start = 0.0
        self.window_count = 0
        self.flooding = False

    def take(self, now: float, token: bool = True) -> bool:
        """Count one message toward the flood rule and, with ``token``, take a token
        for it; whether one was there. A frame that asks nothing (a blank line, a
        piece of a fragmented message, a pong) counts toward the flood only."""
        if self.rate <= 0:  # rate_per_s = 0: no limit
            return True
        if self.stamp is None:
            self.stamp = now
            self.window_start = now
        elapsed = now - self.stamp
        self.stamp = now
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.window_count = 0
        self.window_count += 1
        if self.window_count > self.flood_limit + self.burst:
            self.flooding = True
        if not token:
            return True
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
