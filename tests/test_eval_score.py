"""`dynalign eval score`: two targets' answers scored by a frozen judge, paired, with a CI (a
scripted OpenAI-compatible server over real HTTP, the real openai client)."""

import asyncio
import json
import math
from pathlib import Path

from scripted_openai import ScriptedOpenAI, ScriptedReply, last_user_message

from offline.evaluate import ScoreSettings, read_prompts, run_score
from shared.judge import Endpoint


def _script(request: dict) -> str | ScriptedReply:
    text = last_user_message(request)
    if request["model"] in ("aligned", "base"):
        kind = "An uplifting plan" if request["model"] == "aligned" else "A plan"
        cut = request["model"] == "base" and text.endswith(("0", "1"))  # 2 of 7 hit the limit
        return ScriptedReply(f"{kind} for: {text}", finish_reason="length" if cut else "stop")
    assert request["model"] == "judge" and request["logprobs"] and request["top_logprobs"] == 20
    if "silent" in text:  # a judge reply without log-probs or digits: no score
        return "I cannot say."
    if "uplifting" in text:  # 0.75 x 4 + 0.25 x 3 = 3.75
        return ScriptedReply(
            "4", top_logprobs=[("4", math.log(0.6)), ("3", math.log(0.2)), ("Score", math.log(0.1))]
        )
    return ScriptedReply("2", top_logprobs=[("2", math.log(0.5)), (" 3", math.log(0.5))])


def test_score_differences_are_paired_and_unscored_prompts_left_out(tmp_path: Path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts = [f"Plan task {i}" for i in range(6)] + ["Plan a silent task"]
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    with ScriptedOpenAI(_script) as server:
        server.fail_next(1, status=503)  # retried
        settings = ScoreSettings(
            a=Endpoint(base_url=server.base_url, model="aligned"),
            b=Endpoint(base_url=server.base_url, model="base"),
            judge=Endpoint(base_url=server.base_url, model="judge"),
            n_resamples=200,
        )
        report = asyncio.run(run_score(settings, read_prompts(prompts_file), tmp_path / "out"))
    assert (report.prompts, report.scored, report.a_higher, report.b_higher) == (7, 6, 6, 0)
    assert math.isclose(report.mean_a, 3.75) and math.isclose(report.mean_b, 2.5)
    assert math.isclose(report.diff, 1.25) and report.ci_low == report.ci_high == report.diff
    items = [
        json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()
    ]
    assert items[-1]["score_a"] is None and items[-1]["score_b"] is None
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["diff"] == report.diff and summary["words_ratio"] > 1
    assert (report.truncated_a, report.truncated_b) == (0, 2 / 7)
