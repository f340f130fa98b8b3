"""One typed config for every process: file (TOML/YAML) < environment (DYNALIGN_*) < CLI flags.

Environment variables use `__` between sections: DYNALIGN_SERVING__PORT=8001,
DYNALIGN_KAFKA__BOOTSTRAP=broker:9092, DYNALIGN_LEARNER__LR=1e-5. A file is named by
DYNALIGN_CONFIG or `--config`. The learner's defaults are the paper's (Section 3.1) with a LoRA
learning rate (`learner.profile`); on a machine without a GPU, `cpu_sized()` shrinks only what
must shrink for a newcomer to see a step quickly.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Section(BaseModel):
    """A config section: an unknown key is an error (a misspelt setting must not silently keep
    its default)."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(Section):
    # A hub id or local path; empty means the embedded default (SmolLM2-135M-Instruct from PyPI).
    path: str = ""
    served_name: str = "dynalign"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None  # None = the model's own limit
    max_lora_rank: int = 16
    max_loras: int = 4
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.45
    seed: int = 0
    # Any other `vllm serve` engine flag, as {"max_num_seqs": 64} or `--engine-arg
    # max_num_seqs=64`; validated by vLLM's own parser (see serving/engine.py).
    engine_args: dict[str, Any] = Field(default_factory=dict)


class KafkaConfig(Section):
    # Empty bootstrap = start the embedded Tansu broker (`dynalign up` only).
    bootstrap: str = ""
    topic_prefix: str = "dynalign"
    partitions: int = 3
    # Topic durability: deploy/ asks for 3 and 2 (a write survives one broker's loss; acks=all
    # then fails rather than keep a single copy). 1 and 1 suit one broker.
    replication_factor: int = Field(1, ge=1)
    min_insync_replicas: int = Field(1, ge=1)
    # Largest interaction record as a Kafka message (Kafka's default max.message.bytes): the
    # producer's max_request_size and the topics' max.message.bytes; the outbox sets larger
    # records aside instead of sending them.
    max_message_bytes: int = Field(1 << 20, ge=1024)

    @property
    def interactions_topic(self) -> str:
        return f"{self.topic_prefix}.interactions"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.interactions.dlq"

    @property
    def adapters_topic(self) -> str:
        return f"{self.topic_prefix}.adapters"

    @property
    def feedback_topic(self) -> str:
        return f"{self.topic_prefix}.feedback"


class ServingConfig(Section):
    host: str = "127.0.0.1"
    port: int = 8000
    # Chat API keys, sent as `Authorization: Bearer <key>`. Empty list = no auth, which the
    # server accepts only on a loopback address unless `insecure_no_auth` says otherwise.
    api_keys: list[SecretStr] = Field(default_factory=list)
    # Operators by name -> token, for the /admin routes and pinning unreleased versions; the
    # audit log records the name bound to the token.
    operator_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    insecure_no_auth: bool = False
    # Requests larger than this are refused with 400 before any parsing.
    max_request_bytes: int = 1 << 20
    # Per-request caps (400 above them) and per-client limits (429 + Retry-After). A client is
    # its API key (its address without keys).
    max_n: int = Field(16, ge=1)
    max_tokens: int = Field(4096, ge=1)
    max_concurrent_per_client: int = Field(16, ge=1)
    rate_limit_per_client: float = Field(20.0, gt=0)  # requests per second, sustained
    rate_limit_burst: int = Field(40, ge=1)
    max_in_flight: int = Field(256, ge=1)  # all clients; beyond it the server is saturated
    # The learner's requests on this engine (serving/rollout.py): prompts of at most this many
    # tokens at once (0: no limit), each started only once no user's request is in flight or
    # after waiting this long. 512: one rollout group or one self-score at a time; a user's p50
    # beside the self-scores 1.1-1.25x idle against 2.6x at 2048, for a reward phase of 40 s
    # beside that user against 19 and a gate's answers 14 s against 9 with no user
    # (bench/results/users_first_engine-512.json; `up` whole: bench/results/up.json).
    rollout_prefill_tokens: int = Field(512, ge=0)
    rollout_max_hold_s: float = Field(30.0, ge=0)
    outbox_dir: Path = Path("outbox")  # unless set: in the data directory
    # The outbox's group commit: a record is fsynced together with whatever is queued behind
    # it, after waiting at most this long for more (0: at once; records arriving during an
    # fsync share the next one). An answer waits for its record's fsync (at most
    # outbox_reply_wait_ms, for a stalled disk), so a server killed right after answering has
    # lost nothing it answered.
    outbox_commit_delay_ms: int = Field(0, ge=0)
    outbox_reply_wait_ms: int = Field(1000, ge=0)
    outbox_segment_bytes: int = 16 << 20
    # Records waiting for the outbox's writer; beyond this (the disk refuses writes) new records
    # are dropped and counted rather than held in memory without bound.
    outbox_max_queued_records: int = Field(10_000, ge=1)
    # Secret salt for the HMAC pseudonyms in interaction records (principal_hash, user_hash).
    # Required by `dynalign serve`; `dynalign up` generates one and keeps it in its data dir.
    user_hash_salt: SecretStr | None = None

    @field_validator("api_keys", "operator_tokens", "user_hash_salt")
    @classmethod
    def _no_empty_secrets(cls, value):
        if value is None:
            return value
        secrets = (
            value.values()
            if isinstance(value, dict)
            else value
            if isinstance(value, list)
            else [value]
        )
        if any(not s.get_secret_value().strip() for s in secrets):
            raise ValueError(
                "must not be empty (an empty key would let an empty bearer in, an "
                "empty salt makes pseudonyms guessable)"
            )
        return value


# What the `lora` profile changes from the paper's settings. The paper's lr (5e-6) was chosen
# for fine-tuning gpt-oss-20b; a rank-16 LoRA on it barely moves (per-token KL to base 3e-7
# after two versions). 5e-4 moved the held-out score +0.056 in 18 steps, 1e-3 +0.151 in 10,
# with IFEval and length kept (README "Does it align?", bench/lora_sweep.py).
LORA_PROFILE: dict[str, Any] = {"lr": 1e-3}


class LearnerConfig(Section):
    """GRPO settings: the paper's (Section 3.1), except what the `lora` profile (the default)
    changes for a LoRA adapter; `profile = "paper"` keeps every one of the paper's values."""

    profile: Literal["lora", "paper"] = "lora"
    group_size: int = 8  # G
    batch_completions: int = 32  # completions per optimiser step (prompts = batch / G)
    # Completions per forward/backward pass; gradients accumulate over the passes of a step
    # (TRL: per_device_train_batch_size, with gradient_accumulation_steps = batch / this).
    micro_batch_completions: int = Field(32, ge=1)
    lr: float = 5e-6  # the paper's; the lora profile's is LORA_PROFILE["lr"]
    clip_eps: float = 0.2
    kl_beta: float = 0.04
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024
    reward_mode: Literal["greedy", "expected"] = "expected"
    # A group's reward std below this (0-5 scale) counts as this when scaling advantages, so
    # jitter between near-equal `expected` scores is not amplified into gradient. Integer
    # (`greedy`) scores that differ at all have a std of at least 0.35, above it.
    advantage_std_floor: float = Field(0.1, ge=0.0)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    checkpoint_every_steps: int = 10  # K
    max_grad_norm: float = 1.0
    max_user_share: float = 0.25  # of a batch, per principal (API key); over it prompts wait
    # Prompts waiting for a batch (the share cap); past this the principal with the most loses
    # its oldest (dynalign_learner_records_skipped_total{reason="deferred_overflow"}).
    max_deferred_prompts: int = Field(1024, ge=1)
    # Record ids and prompt hashes remembered to drop repeats (two keys per prompt read).
    dedupe_keys: int = 10_000
    consumer_group: str = "dynalign-learner"
    metrics_port: int = 9401
    train_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    seed: int = 0
    # Where rollouts and self-scores run: `dynalign serve` engines (their base URLs; the first
    # that answers, the next when one fails), reached with an operator token. Empty: an engine
    # of the learner's own (offline tools; `dynalign up` points its learner at its server).
    rollout_endpoints: list[str] = Field(default_factory=list)
    rollout_token: SecretStr | None = None
    # Rollout and score requests in flight at once per endpoint (a rollout request is a group of
    # G): enough for the engine to batch a whole step on a GPU, few enough to stay polite.
    rollout_concurrency: int = Field(64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        """The profile's values fill in what the user did not set."""
        if isinstance(data, dict) and data.get("profile", "lora") == "lora":
            return {**LORA_PROFILE, **data}
        return data

    def cpu_sized(self) -> LearnerConfig:
        """What a 2-core CPU can step within minutes. Only settings the user did not set are
        changed; everything else stays the paper's."""
        # 128 new tokens: at 48 nearly every answer was cut, so reward and loss saw fragments
        # (bench/results/lora_sweep.json). K=1: every step's adapter is a candidate; at K=2
        # the first promoted adapter answered 5.5 minutes after the first chat (a step ~80 s
        # beside a user, then the gate; bench/results/up.json). Micro-batches of 2: the
        # update's peak RSS 2.9 GiB instead of 8.1 with 8, and 25 s a step instead of 34
        # (bench/results/learner_memory.json).
        smaller = dict(
            batch_completions=16,
            micro_batch_completions=2,
            max_new_tokens=128,
            checkpoint_every_steps=1,
            train_dtype="float32",
        )
        return self.model_copy(
            update={k: v for k, v in smaller.items() if k not in self.model_fields_set}
        )


class GateConfig(Section):
    """Candidate vs live before anything goes live (see learner/gate.py)."""

    enabled: bool = True
    auto_promote: bool = True  # False: a passing candidate waits for an operator's promote
    probe_prompts: Path | None = None  # JSONL; default: shared/data/probe_prompts.jsonl
    # Primary evidence: the frozen base model's CA score (0-5) of candidate vs live answers,
    # paired per probe, with a bootstrap CI. 48 probes: a per-probe difference spread of 0.3
    # gives a CI half-width of about 0.085, inside the margin (tests/test_gate_decision.py).
    probe_limit: int = 48
    max_new_tokens: int = 128
    # pass: the CI's low end is above -score_margin (not worse by more than the margin);
    # reject: its high end is below -score_margin; anything between is inconclusive.
    score_margin: float = Field(0.15, gt=0)
    # An inconclusive candidate is held for an operator (state `inconclusive`), or promoted or
    # rejected outright; `dynalign up`'s demo promotes.
    on_inconclusive: Literal["hold", "promote", "reject"] = "hold"
    bootstrap_resamples: int = 2000
    # "URL#model" of an OpenAI-compatible judge for a pairwise verdict besides the score (the
    # paper's GPT-4.1 is one flag away); "" = none (the policy as its own pairwise judge answers
    # by position, so it is not asked).
    judge_endpoint: str = ""
    min_win_rate: float = 0.5  # reject when the win rate's whole CI is below this
    max_kl: float = 0.5  # nats per token, candidate vs base, on the candidate's answers
    max_length_ratio: float = 1.5  # mean answer length, candidate / live
    # Capability canary: IFEval prompt-level strict accuracy on the first N prompts, candidate
    # vs live; 0 turns it off.
    ifeval_prompts: int = 24
    max_ifeval_drop: float = 0.15
    # Canary rollout of a passing candidate (shared/canary.py): 0 = it goes live at once; else it
    # first serves this share of the main alias's users, until the canary rule decides on their
    # ratings. Ratings per arm before a decision, the horizon, and the margin (share of
    # negative ratings) within which the canary counts as not worse.
    canary_share: float = Field(0.0, ge=0, lt=1)
    canary_min_ratings: int = Field(100, ge=1)
    canary_max_ratings: int = Field(400, ge=1)
    canary_margin: float = Field(0.10, gt=0)

    def canary_rule(self, share: float | None = None) -> dict[str, float]:
        """A Canary's settings as the registry keeps them (shared/registry.Canary)."""
        return dict(
            share=share or self.canary_share,
            min_ratings=self.canary_min_ratings,
            max_ratings=self.canary_max_ratings,
            margin=self.canary_margin,
        )

    def cpu_sized(self) -> GateConfig:
        smaller = dict(probe_limit=24, max_new_tokens=48, ifeval_prompts=8)
        return self.model_copy(
            update={k: v for k, v in smaller.items() if k not in self.model_fields_set}
        )


class RegistryConfig(Section):
    store: Path = Path("adapters")  # unless set: in the data directory
    # The learner's working adapters, which the servers it rolls out on load by name
    # (serving/rollout.py): a directory they share with it, like the store.
    rollout_dir: Path = Path("rollout-adapters")  # unless set: in the data directory
    keep_loaded: int = 3


def default_data_dir() -> Path:
    """Per user, not the working directory, so that `dynalign adapters list` run from another
    folder sees the same registry ($XDG_DATA_HOME/dynalign on Linux, via platformdirs)."""
    return Path(platformdirs.user_data_dir("dynalign", appauthor=False))


class DynalignConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DYNALIGN_", env_nested_delimiter="__", extra="forbid"
    )

    # Where every piece of state lives unless set on its own: the outbox (with the embedded
    # broker's log), the adapter registry, the learner's checkpoints, the demo's salt.
    # DYNALIGN_DATA_DIR or --data-dir.
    data_dir: Path = Field(default_factory=default_data_dir)

    model: ModelConfig = Field(default_factory=ModelConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    gate: GateConfig = Field(default_factory=GateConfig)

    @model_validator(mode="after")
    def _state_in_data_dir(self) -> DynalignConfig:
        if "outbox_dir" not in self.serving.model_fields_set:
            self.serving.outbox_dir = self.data_dir / "outbox"
        if "store" not in self.registry.model_fields_set:
            self.registry.store = self.data_dir / "adapters"
        if "rollout_dir" not in self.registry.model_fields_set:
            self.registry.rollout_dir = self.data_dir / "rollout-adapters"
        return self

    @property
    def learner_workdir(self) -> Path:
        """The live learner's checkpoints (a replay gets its own beside it)."""
        return self.data_dir / "learner"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: flags (init) > environment > file.
        return (init_settings, env_settings, _FileSource(settings_cls))


class _FileSource(PydanticBaseSettingsSource):
    """Reads the file named by DYNALIGN_CONFIG (TOML or YAML)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("DYNALIGN_CONFIG")
        if not path:
            return {}
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            return yaml.safe_load(text) or {}
        return tomllib.loads(text)


def load_config(
    config_file: Path | None = None, data_dir: Path | None = None, **flags: dict[str, Any]
) -> DynalignConfig:
    """Build and validate the config; `flags` are per-section dicts of values given on the
    command line (None values are dropped, so an unset flag never hides the file or
    environment). pydantic-settings merges flags > environment > file section by section and
    validates the result, so a bad value from any source fails here naming its field; sections
    remember which fields were set by any source (pydantic's model_fields_set)."""
    if config_file is not None:
        os.environ["DYNALIGN_CONFIG"] = str(config_file)
    given = {
        section: {k: v for k, v in values.items() if v is not None}
        for section, values in flags.items()
    }
    top = {"data_dir": data_dir} if data_dir is not None else {}
    return DynalignConfig(**top, **{section: values for section, values in given.items() if values})
