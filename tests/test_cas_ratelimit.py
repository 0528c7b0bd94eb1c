"""Request rate limits: a client over its rate is refused with 429, others are not."""

from __future__ import annotations

from cas_fixtures import StartCas, anonymous_http

from tdapp.cas.ratelimit import RateLimit


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    limit = RateLimit(per_second=10, burst=3)
    assert [limit.allow("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.allow("a", now=0.0) > 0  # the burst is spent
    assert limit.allow("b", now=0.0) == 0.0  # another client has its own bucket
    assert limit.allow("a", now=0.1) == 0.0  # 0.1 s at 10/s refills one token


def test_a_flooding_client_gets_429_with_a_reason(cas_server: StartCas) -> None:
    server = cas_server(extra=("--rate-limit", "2"))
    with anonymous_http(server) as http:
        answers = [http.get("/v1/health") for _ in range(12)]
    limited = [a for a in answers if a.status_code == 429]
    assert answers[0].status_code == 200 and limited
    assert "too many requests" in limited[0].json()["error"]
    assert int(limited[0].headers["Retry-After"]) >= 1
