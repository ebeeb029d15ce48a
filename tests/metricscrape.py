"""Reading a gateway's /metrics in tests: every sample by name and labels, and sums."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, token: str | None) -> dict[str, float]:
    """GET ``url`` (with ``token`` as bearer, if any); every sample as ``name{k=v,...}``."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(url, headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def total(values: dict[str, float], prefix: str, **labels: str) -> float:
    """The sum of the samples of ``prefix`` whose labels include ``labels``."""
    wanted = [f"{k}={v}" for k, v in labels.items()]
    return sum(
        v for k, v in values.items() if k.startswith(prefix + "{") and all(w in k for w in wanted)
    )
