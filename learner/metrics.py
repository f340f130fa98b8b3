"""The learner's Prometheus metrics (its own port; prefix `dynalign_learner_`)."""

from prometheus_client import Counter, Gauge, Histogram

STEPS = Counter("dynalign_learner_steps_total", "GRPO optimiser steps taken.")
CHECKPOINTS = Counter("dynalign_learner_checkpoints_total", "Checkpoints written.")
RECORDS_CONSUMED = Counter("dynalign_learner_records_consumed_total",
                           "Interaction records read from Kafka.")
RECORDS_SKIPPED = Counter("dynalign_learner_records_skipped_total",
                          "Readable records not used for training, by reason.", ["reason"])
RECORDS_DEAD_LETTERED = Counter("dynalign_learner_records_dead_lettered_total",
                                "Unreadable records sent to the dead-letter topic.")
REWARD = Histogram("dynalign_learner_reward", "Self-reward of each scored candidate (0-5).",
                   buckets=(0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5))
REWARD_MEAN = Gauge("dynalign_learner_reward_mean", "Mean self-reward of the last step.")
REWARD_STD = Gauge("dynalign_learner_reward_std", "Std of self-reward within the last step.")
ZERO_VARIANCE_GROUPS = Gauge("dynalign_learner_zero_variance_group_ratio",
                             "Share of the last step's groups whose rewards were all equal.")
UNPARSABLE_SCORES = Counter("dynalign_learner_unparsable_scores_total",
                            "Candidates whose self-score could not be read.")
SCORED = Counter("dynalign_learner_scored_candidates_total", "Candidates the policy scored.")
KL = Gauge("dynalign_learner_kl", "Mean per-token KL to the base model in the last step.")
LOSS = Gauge("dynalign_learner_loss", "GRPO loss of the last step.")
GRAD_NORM = Gauge("dynalign_learner_grad_norm", "Gradient norm of the last step (pre-clip).")
COMPLETION_TOKENS = Histogram("dynalign_learner_completion_tokens",
                              "Length of each rollout completion in tokens.",
                              buckets=(8, 16, 32, 64, 128, 256, 512, 1024))
CONSUMER_LAG = Gauge("dynalign_learner_consumer_lag_records",
                     "Interaction records not yet read by the learner.")
TOKENS_PER_SECOND = Gauge("dynalign_learner_tokens_per_second",
                          "Rollout + training tokens per second over the last step.")
STEP_SECONDS = Histogram("dynalign_learner_step_seconds", "Wall time of one learner step, by phase.",
                         ["phase"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
LAST_CANDIDATE_VERSION = Gauge("dynalign_learner_last_candidate_version",
                               "Adapter version of the newest candidate the learner published.")
