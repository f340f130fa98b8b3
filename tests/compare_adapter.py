"""How far a PEFT adapter served by vLLM moves the base model: the base's greedy answers to two
chats, scored token by token with and without the adapter. Prints one JSON line.

    python tests/compare_adapter.py MODEL_DIR ADAPTER_DIR

Log-probabilities, not greedy text: two small steps on a random tiny model move them clearly
but need not flip an argmax.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from shared.config import ModelConfig
    from shared.engine import engine_kwargs

    model, adapter = sys.argv[1], sys.argv[2]
    llm = LLM(**engine_kwargs(ModelConfig(path=model, max_model_len=512)))
    chats = [[{"role": "user", "content": text}] for text in ("Plan my week", "hello")]
    answers = llm.chat(chats, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    sequences = [
        {"prompt_token_ids": [*a.prompt_token_ids, *a.outputs[0].token_ids]} for a in answers
    ]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def logprobs(lora: LoRARequest | None) -> list[float]:
        out = llm.generate(sequences, score, lora_request=lora, use_tqdm=False)
        return [
            next(iter(step.values())).logprob
            for o in out
            for step in o.prompt_logprobs
            if step is not None
        ]

    base, tuned = logprobs(None), logprobs(LoRARequest("candidate", 1, adapter))
    print(
        json.dumps(
            {
                "base_answers": [a.outputs[0].text for a in answers],
                "max_logprob_change": max(abs(b - t) for b, t in zip(base, tuned, strict=True)),
            }
        )
    )


if __name__ == "__main__":
    main()
