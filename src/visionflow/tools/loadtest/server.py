"""The server's own view of a phase, from two reads of its /metrics: its latency without network and client, how
busy its inference thread was, and how requests were batched."""

from __future__ import annotations

from typing import Any

from visionflow.tools.loadtest.phases import Phase


async def scrape_metrics(client, base: str) -> dict[tuple[str, tuple], float] | None:
    """The server's own counters (/metrics), keyed by (sample name, labels); None when it has none to give."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(f"{base}/metrics")
        if r.status_code != 200:
            return None
        return {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(r.text)
            for x in fam.samples
            if x.name.startswith("visionflow_")
        }
    except (httpx.HTTPError, ValueError):
        return None


def _bucket_quantile(delta: dict[tuple[str, tuple], float], name: str, q: float, **labels: str) -> float | None:
    """The upper bound (ms) of the histogram bucket that holds the q-quantile: "at most this", not interpolated."""
    buckets = []
    for (sample, lbls), v in delta.items():
        d = dict(lbls)
        if sample == f"{name}_bucket" and all(d.get(k) == val for k, val in labels.items()):
            buckets.append((float(d["le"]), v))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    for le, count in buckets:
        if count >= q * buckets[-1][1]:
            return None if le == float("inf") else round(le * 1000, 3)
    return None


def server_view(before: dict | None, after: dict | None, elapsed_s: float) -> dict[str, Any] | None:
    """What the server says of one phase: its own latency (from its histogram: network and client excluded), how
    busy its inference thread was, how many requests each batch took and how long they queued for it."""
    if not before or not after:
        return None
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}

    def total(name: str) -> float:
        return delta.get((name, ()), 0.0)

    batches, busy_s = total("visionflow_inference_seconds_count"), total("visionflow_inference_seconds_sum")
    ok = delta.get(("visionflow_requests_total", (("endpoint", "predict"), ("status", "200"))), 0.0)
    view: dict[str, Any] = {
        "ok_requests": int(ok),
        "p50_ms_at_most": _bucket_quantile(delta, "visionflow_request_seconds", 0.5, endpoint="predict"),
        "p99_ms_at_most": _bucket_quantile(delta, "visionflow_request_seconds", 0.99, endpoint="predict"),
    }
    if batches > 0:  # a server from before these metrics has none
        waits = total("visionflow_inference_queue_seconds_count")
        view.update(
            inference_busy=round(busy_s / max(elapsed_s, 1e-9), 3),
            batches=int(batches),
            requests_per_batch=round(total("visionflow_inference_batch_requests_sum") / batches, 2),
            inference_ms_per_batch=round(busy_s / batches * 1000, 3),
            queue_wait_ms_mean=round(total("visionflow_inference_queue_seconds_sum") / max(waits, 1) * 1000, 3),
            queue_wait_ms_p99_at_most=_bucket_quantile(delta, "visionflow_inference_queue_seconds", 0.99),
        )
    return view


async def seen_by_server(client, base: str, phase) -> Phase:
    """Run a phase (a coroutine) between two reads of the server's /metrics, and attach its view of it."""
    before = await scrape_metrics(client, base)
    ph = await phase
    ph.server = server_view(before, await scrape_metrics(client, base), ph.elapsed_s)
    return ph
