from nanovllm.beam_search_params import BeamSearchParams
from nanovllm.engine.beam_search import beam_search
from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.outputs import BeamSearchOutput


class LLM(LLMEngine):
    """The user-facing entry point: `LLM(model, **engine_args).generate(prompts, params)`."""

    def beam_search(self, prompts: Prompt | list[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """Per prompt, its beam_width best beams, best first, ranked as HF's `generate(num_beams=...)`."""
        return beam_search(self, prompts, params, use_tqdm)
