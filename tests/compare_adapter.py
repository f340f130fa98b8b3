"""Greedy outputs of base vs a PEFT adapter, through vLLM. Prints one JSON line.

    python tests/compare_adapter.py MODEL_DIR ADAPTER_DIR
"""

import json
import os
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model, adapter = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, enable_lora=True,
              max_lora_rank=16, max_model_len=512)
    prompts = [[{"role": "user", "content": text}] for text in ("Plan my week", "hello")]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    base = [o.outputs[0].text for o in llm.chat(prompts, greedy, use_tqdm=False)]
    tuned = [o.outputs[0].text for o in llm.chat(prompts, greedy, use_tqdm=False,
                                                lora_request=LoRARequest("candidate", 1, adapter))]
    print(json.dumps({"base": base, "adapter": tuned}))


if __name__ == "__main__":
    main()
