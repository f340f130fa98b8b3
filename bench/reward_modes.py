"""Self-reward modes compared on the same candidates: `greedy` (the paper's: parse the judge's
greedy text) vs `expected` (probability-weighted digit at the answer position). Writes JSON with
each mode's unparsable rate, zero-variance group share and per-group score spread.

    python bench/reward_modes.py                 # SmolLM2-135M-Instruct, 3 probe prompts x G=8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "reward_modes.json"))
    args = parser.parse_args()

    from learner.gate import probe_prompts
    from learner.rollout import InProcessEngine
    from shared.config import GateConfig, LearnerConfig, ModelConfig

    learner_cfg = LearnerConfig(max_new_tokens=args.max_new_tokens)
    conversations = probe_prompts(GateConfig(probe_limit=args.prompts))
    with tempfile.TemporaryDirectory() as tmp:
        engine = InProcessEngine(
            ModelConfig(path=args.model, max_model_len=4096), learner_cfg, Path(tmp)
        )
        candidates = engine.sample(conversations)
        result = {
            "benchmark": "reward_modes",
            "model": args.model or "SmolLM2-135M-Instruct",
            "prompts": len(conversations),
            "group_size": learner_cfg.group_size,
        }
        for mode in ("greedy", "expected"):
            engine.cfg = learner_cfg.model_copy(update={"reward_mode": mode})
            scores = engine.self_scores(conversations, candidates)
            flat = [s for group in scores for s in group]
            valid_groups = [[s for s in group if s is not None] for group in scores]
            result[mode] = {
                "scores": scores,
                "unparsable_rate": sum(s is None for s in flat) / len(flat),
                "zero_variance_group_share": sum(len(set(g)) <= 1 for g in valid_groups)
                / len(valid_groups),
                "group_spread": [max(g) - min(g) if g else None for g in valid_groups],
                "mean": statistics.fmean([s for s in flat if s is not None] or [float("nan")]),
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                m: {k: v for k, v in result[m].items() if k != "scores"}
                for m in ("greedy", "expected")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
