"""Greedy outputs of base vs a PEFT adapter, through vLLM. Prints one JSON line.

python tests/compare_adapter.py MODEL_DIR ADAPTER_DIR
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
    prompts = [[{"role": "user", "content": text}] for text in ("Plan my week", "hello")]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    base = [o.outputs[0].text for o in llm.chat(prompts, greedy, use_tqdm=False)]
    tuned = [
        o.outputs[0].text
        for o in llm.chat(
            prompts, greedy, use_tqdm=False, lora_request=LoRARequest("candidate", 1, adapter)
        )
    ]
    print(json.dumps({"base": base, "adapter": tuned}))


if __name__ == "__main__":
    main()
