"""The learner's Prometheus metrics (its own port; prefix `dynalign_learner_`)."""

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("dynalign_learner_steps_total", "GRPO optimiser steps taken.")
CHECKPOINTS = Counter("dynalign_learner_checkpoints_total", "Checkpoints written.")
RECORDS_CONSUMED = Counter(
    "dynalign_learner_records_consumed_total", "Interaction records read from Kafka."
)
RECORDS_SKIPPED = Counter(
    "dynalign_learner_records_skipped_total",
    "Readable records not used for training, by reason.",
    ["reason"],
)
OFFSET_RESETS = Counter(
    "dynalign_learner_offset_resets_total",
    "Partitions whose resume offset the topic no longer held (learner.consumer.start_offset).",
    ["direction"],
)
RECORDS_DEAD_LETTERED = Counter(
    "dynalign_learner_records_dead_lettered_total",
    "Unreadable records sent to the dead-letter topic.",
)
DEFERRED_PROMPTS = Gauge(
    "dynalign_learner_deferred_prompts",
    "Prompts read but not yet in a batch (deferred by the per-principal share "
    "cap, or waiting for the batch to fill); kept in checkpoints.",
)
WAITING_ON_SHARE_CAP = Gauge(
    "dynalign_learner_waiting_on_share_cap",
    "1 while no batch can form because the per-principal share cap holds "
    "deferred prompts back (too few principals have prompts waiting).",
)
REWARD = Histogram(
    "dynalign_learner_reward",
    "Self-reward of each scored candidate (0-5).",
    buckets=(0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5),
)
REWARD_MEAN = Gauge("dynalign_learner_reward_mean", "Mean self-reward of the last step.")
REWARD_STD = Gauge("dynalign_learner_reward_std", "Std of self-reward within the last step.")
ZERO_VARIANCE_GROUPS = Gauge(
    "dynalign_learner_zero_variance_group_ratio",
    "Share of the last step's groups whose rewards were all equal.",
)
UNPARSABLE_SCORES = Counter(
    "dynalign_learner_unparsable_scores_total", "Candidates whose self-score could not be read."
)
SCORED = Counter("dynalign_learner_scored_candidates_total", "Candidates the policy scored.")
KL = Gauge("dynalign_learner_kl", "Mean per-token KL to the base model in the last step.")
LOSS = Gauge("dynalign_learner_loss", "GRPO loss of the last step.")
GRAD_NORM = Gauge("dynalign_learner_grad_norm", "Gradient norm of the last step (pre-clip).")
COMPLETION_TOKENS = Histogram(
    "dynalign_learner_completion_tokens",
    "Length of each rollout completion in tokens.",
    buckets=(8, 16, 32, 64, 128, 256, 512, 1024),
)
CONSUMER_LAG = Gauge(
    "dynalign_learner_consumer_lag_records", "Interaction records not yet read by the learner."
)
TOKENS_PER_SECOND = Gauge(
    "dynalign_learner_tokens_per_second", "Rollout + training tokens per second over the last step."
)
STEP_SECONDS = Histogram(
    "dynalign_learner_step_seconds",
    "Wall time of one learner step, by phase.",
    ["phase"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STEP_IN_FLIGHT = Gauge(
    "dynalign_learner_step_in_flight",
    "1 while a step (rollouts, update, checkpoint, gate) computes; 0 while the learner waits "
    "for prompts or on pause-learning. After a pause, 0 means no step will start.",
)
ROLLOUT_FAILOVERS = Counter(
    "dynalign_learner_rollout_failovers_total",
    "Rollout endpoints that failed mid-request (learner/served.py); their requests were sent "
    "again to the next endpoint.",
)
LAST_CANDIDATE_VERSION = Gauge(
    "dynalign_learner_last_candidate_version",
    "Adapter version of the newest candidate the learner published.",
)

# -- Drift and reward-hacking signals (learner/drift.py), one series per adapter version ----------
# `adapter_version` is the version the policy descends from ("base" before the first one), as
# on the server's metrics. Only the newest few versions keep their series.
_VERSION = ["adapter_version"]
DRIFT_REWARD_PSI = Gauge(
    "dynalign_learner_drift_reward_psi",
    "Population stability index of self-rewards, recent window vs reference (6 bins over 0-5).",
    _VERSION,
)
DRIFT_REWARD_JS = Gauge(
    "dynalign_learner_drift_reward_js_bits",
    "Jensen-Shannon divergence (base 2, 0-1) of self-rewards, recent window vs reference.",
    _VERSION,
)
DRIFT_REWARD_SATURATION = Gauge(
    "dynalign_learner_drift_reward_saturation_ratio",
    "Share of the recent window's self-rewards that round to 5 (the top of the scale).",
    _VERSION,
)
DRIFT_ZERO_VARIANCE_GROUPS = Gauge(
    "dynalign_learner_drift_zero_variance_group_ratio",
    "Share of groups with all-equal rewards over the recent window (no GRPO signal).",
    _VERSION,
)
DRIFT_COMPLETION_TOKENS_MEAN = Gauge(
    "dynalign_learner_drift_completion_tokens_mean",
    "Mean rollout completion length in tokens over the recent window.",
    _VERSION,
)
DRIFT_COMPLETION_TOKENS_P95 = Gauge(
    "dynalign_learner_drift_completion_tokens_p95",
    "95th percentile of rollout completion length in tokens over the recent window.",
    _VERSION,
)
DRIFT_COMPLETION_TOKENS_PSI = Gauge(
    "dynalign_learner_drift_completion_tokens_psi",
    "Population stability index of completion lengths, recent window vs reference.",
    _VERSION,
)
DRIFT_LENGTH_REWARD_SPEARMAN = Gauge(
    "dynalign_learner_drift_length_reward_spearman",
    "Spearman rank correlation of completion length with self-reward over the recent window "
    "(NaN when either is constant).",
    _VERSION,
)
PROBE_KL = Gauge(
    "dynalign_learner_probe_kl_nats",
    "Mean per-token KL(version || base) on the gate's fixed probe prompts.",
    _VERSION,
)
GATE_SCORE_DIFF = Gauge(
    "dynalign_learner_gate_score_diff",
    "Gate: mean frozen-judge CA score (0-5) of the version's probe answers minus live's.",
    _VERSION,
)
GATE_WIN_RATIO = Gauge(
    "dynalign_learner_gate_win_ratio",
    "Gate (with a judge endpoint): share of consistent pairwise judgements won against live.",
    _VERSION,
)
GATE_OUTCOMES = Counter(
    "dynalign_learner_gate_outcomes_total",
    "Gate verdicts by outcome: pass, reject, inconclusive.",
    ["outcome"],
)
for _outcome in ("pass", "reject", "inconclusive"):
    GATE_OUTCOMES.labels(_outcome)  # exported from the start, so increase() has a series
IFEVAL_CANARY_ACCURACY = Gauge(
    "dynalign_learner_ifeval_canary_accuracy_ratio",
    "IFEval canary prompt-level strict accuracy of the version.",
    _VERSION,
)

# Users' signal per adapter version (learner/signals.py).
ANSWER_OUTCOMES = Counter(
    "dynalign_answer_outcomes_total",
    "Logged answers by what the user did next: regenerated, rephrased (a near-duplicate next "
    "turn), continued, abandoned (no next turn in time); by the version that answered.",
    ["adapter_version", "outcome"],
)
USER_RATINGS = Gauge(
    "dynalign_user_ratings",
    "Answers rated by users (the last rating per answer and rater), by version.",
    ["adapter_version"],
)
USER_RATING_MEAN = Gauge(
    "dynalign_user_rating_mean",
    "Mean user rating (1-5; thumbs: down 1, up 5), by version.",
    ["adapter_version"],
)
USER_NEGATIVE_SHARE = Gauge(
    "dynalign_user_negative_share",
    "Share of user ratings that are negative (thumbs down, 1-2 of 5), by version.",
    ["adapter_version"],
)
CANARY_NEGATIVE_DIFF = Gauge(
    "dynalign_canary_negative_share_diff",
    "Running canary: its share of negative user ratings minus live's (shared/canary.py).",
)
