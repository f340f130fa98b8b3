"""The server's Prometheus metrics (prefix `dynalign_`, units in names, `_total` counters).

The engine runs with vLLM's `--disable-log-stats` (as the benchmark's `vllm serve` anchor does),
so vLLM's own `vllm:*` metrics are not exported.
"""

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 5 ms to 2 min: CPU serving of long completions sits at the top end.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "dynalign_requests_total",
    "Chat completion requests by requested model alias, serving adapter version and HTTP status.",
    ["model", "adapter_version", "status"],
)
REQUEST_LATENCY = Histogram(
    "dynalign_request_latency_seconds",
    "Time from request receipt to the last byte of the response.",
    ["model", "adapter_version"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "dynalign_time_to_first_token_seconds",
    "Streaming requests: time from receipt to the first content chunk.",
    ["model", "adapter_version"],
    buckets=LATENCY_BUCKETS,
)
COMPLETION_TOKENS = Histogram(
    "dynalign_completion_tokens",
    "Tokens of each answered request's completion(s), by the adapter version that answered.",
    ["adapter_version"],
    buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
TOKENS = Counter(
    "dynalign_tokens_total", "Tokens processed, by kind (prompt, completion).", ["kind"]
)
INTERACTIONS_LOGGED = Counter(
    "dynalign_interactions_logged_total", "Interaction records appended to the outbox."
)
INTERACTIONS_OPTED_OUT = Counter(
    "dynalign_interactions_opted_out_total", "Served requests that opted out of training."
)
INTERACTIONS_PUBLISHED = Counter(
    "dynalign_interactions_published_total", "Interaction records acknowledged by Kafka."
)
FEEDBACK_LOGGED = Counter(
    "dynalign_feedback_logged_total", "Ratings (POST /v1/feedback) appended to the outbox."
)
FEEDBACK_PUBLISHED = Counter(
    "dynalign_feedback_published_total", "Ratings acknowledged by Kafka (dynalign.feedback)."
)
FEEDBACK_RATING = Histogram(
    "dynalign_feedback_rating",
    "Ratings accepted (POST /v1/feedback) on the 1-5 scale (thumbs: down 1, up 5), by the "
    "adapter version that served the rated answer: _sum/_count is the mean rating, "
    'bucket{le="2"}/_count the share of negative ratings.',
    ["adapter_version"],
    buckets=(1, 2, 3, 4, 5),
)
OUTBOX_DEPTH = Gauge(
    "dynalign_outbox_depth_records", "Records in the outbox not yet acknowledged by Kafka."
)
OUTBOX_PUBLISH_ERRORS = Counter(
    "dynalign_outbox_publish_errors_total", "Failed attempts to publish outbox records."
)
OUTBOX_WRITE_ERRORS = Counter(
    "dynalign_outbox_write_errors_total",
    "Failed writes of outbox segments (disk full, I/O error); the batch is written again.",
)
OUTBOX_PROBLEM = Gauge(
    "dynalign_outbox_problem",
    "1 while the outbox loses records or puts them at risk (Outbox.problem; /health answers 503).",
)
OUTBOX_DROPPED = Counter(
    "dynalign_outbox_dropped_total",
    "Records lost before reaching the outbox's disk: queue_full (the writer could not keep up or "
    "the disk refused writes), shutdown (the disk still refused them at close).",
    ["reason"],
)
OUTBOX_DEAD_LETTERED = Counter(
    "dynalign_outbox_dead_lettered_total",
    "Records set aside in the outbox's dead-letter.jsonl instead of Kafka: unserialisable, "
    "oversized (over kafka.max_message_bytes), rejected (refused by the producer), garbled "
    "(an unreadable segment line).",
    ["reason"],
)
OUTBOX_REPLIES_BEFORE_DISK = Counter(
    "dynalign_outbox_replies_before_disk_total",
    "Answers sent before their record reached the outbox's disk: the disk stalled past "
    "serving.outbox_reply_wait_ms (a crash then could lose the record).",
)
OUTBOX_RESEEDED = Counter(
    "dynalign_outbox_reseeded_records_total",
    "Records the outbox sent again to an embedded broker that restarted empty (Outbox.reseed).",
)
# Every reason exported from the start (at 0), so that rates and alerts see the series.
for _reason in ("queue_full", "shutdown"):
    OUTBOX_DROPPED.labels(_reason)
for _reason in ("unserialisable", "oversized", "rejected", "garbled"):
    OUTBOX_DEAD_LETTERED.labels(_reason)
LIVE_ADAPTER_VERSION = Gauge(
    "dynalign_live_adapter_version", "Adapter version the main alias serves (0 = base model)."
)
CANARY_VERSION = Gauge(
    "dynalign_canary_adapter_version",
    "Adapter version serving the canary share of the main alias (0 = no canary).",
)
CANARY_SHARE = Gauge(
    "dynalign_canary_share", "Share of the main alias's users the canary serves (0 = none)."
)
ADAPTER_SWAPS = Counter(
    "dynalign_adapter_swaps_total", "Alias moves applied by this server (promote or rollback)."
)
ADAPTER_SWAP_FAILURES = Counter(
    "dynalign_adapter_swap_failures_total",
    "Adapter versions this server refused or failed to load, by reason.",
    ["reason"],
)
ADAPTERS_LOADED = Gauge("dynalign_adapters_loaded", "Adapter versions loaded in the engine.")
REQUESTS_LIMITED = Counter(
    "dynalign_requests_limited_total",
    "Requests refused with 429 by the per-client limits, by reason (capacity, concurrency, rate).",
    ["reason"],
)
ROLLOUT_WAIT = Histogram(
    "dynalign_rollout_wait_seconds",
    "How long a learner's request waited for its turn behind users' requests (serving/rollout.py).",
    buckets=LATENCY_BUCKETS,
)
ROLLOUT_HOLD_EXPIRED = Counter(
    "dynalign_rollout_hold_expired_total",
    "Learner's requests started while users' requests were in flight: their hold ran out.",
)
