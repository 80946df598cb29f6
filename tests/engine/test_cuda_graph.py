"""The CUDA graphs' inputs: a step's arrays land where the graphs read them, in one upload."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nanovllm.attention.metadata import build_layout
from nanovllm.engine.cuda_graph import StaticInputs, graph_batch_sizes
from nanovllm.engine.step_inputs import StepInputs
from nanovllm.engine.uploader import Uploader

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason="needs CUDA")])]


def decode_step(seq_lens: list[int], rows: int, seed: int) -> StepInputs:
    """A decode step of len(seq_lens) sequences padded to `rows`, with random block tables."""
    rng = np.random.default_rng(seed)
    tables = [rng.integers(0, 1000, -(-n // 16)).tolist() for n in seq_lens]
    layout = build_layout([1] * len(seq_lens), seq_lens, tables, 16, num_rows=rows, max_seq_len=256)
    ids = np.zeros(rows, np.int64)
    ids[: len(seq_lens)] = rng.integers(0, 5000, len(seq_lens))
    prev = np.full(rows, -1, np.int64)
    prev[0] = 2  # the first row's token is still on the device, row 2 of the last samples
    return StepInputs(ids, prev, np.arange(len(seq_lens)), layout, np.zeros((0, 2), np.int64), True,
                      len(seq_lens), True)


@pytest.mark.parametrize("device", DEVICES)
def test_load_puts_each_array_where_the_graphs_read_it(device):
    inputs = StaticInputs(max_tokens=16, max_rows=16, max_blocks_per_seq=8, device=torch.device(device))
    inputs.block_tables.fill_(-7)  # columns past a step's width keep what they held
    upload = Uploader(torch.device(device))
    for seed, (seq_lens, rows) in enumerate([([5, 40, 100], 4), ([17] * 7 + [3], 8)]):
        step = decode_step(seq_lens, rows, seed)
        rng = np.random.default_rng(seed)
        draw = (rng.random(rows).astype(np.float32), rng.random(rows) < 0.5, rng.integers(0, 2**32, (rows, 2)))
        extra = [np.arange(5) * seed, np.array([1.5, -2.0], np.float32)]
        got = inputs.load(upload, step, draw, extra)
        layout = step.layout
        want = {"input_ids": step.input_ids, "prev_rows": step.prev_rows, "positions": layout.positions,
                "slot_mapping": layout.slot_mapping, "query_start_loc": layout.query_start_loc,
                "seq_lens": layout.seq_lens, "seq_start_loc": layout.seq_start_loc, "inv_t": draw[0],
                "greedy": draw[1], "keys": draw[2]}
        for name, array in want.items():
            view = getattr(inputs, name)[: len(array)]
            np.testing.assert_array_equal(view.cpu().numpy(), array, err_msg=name)
        assert inputs.seq_lens.dtype == torch.int32 and inputs.block_tables.dtype == torch.int32
        width = layout.block_tables.shape[1]
        np.testing.assert_array_equal(inputs.block_tables[:rows, :width].cpu().numpy(), layout.block_tables)
        assert (inputs.block_tables[:, 7] == -7).all()  # wider than either step's tables
        for tensor, array in zip(got, extra):
            np.testing.assert_array_equal(tensor.cpu().numpy(), array)
    inputs.load(upload, decode_step([9], 1, 5), None, [])  # nothing drawn (tensor parallelism)
    assert inputs.seq_lens[0].item() == 9 and inputs.positions[0].item() == 8


def test_verify_step_without_device_tokens_reads_none():
    """A verify step has no rows whose token is on the device: every token's prev_rows is -1."""
    layout = build_layout([3, 2], [10, 20], [[1], [2, 3]], 16, num_rows=2, num_tokens=6, max_query_len=3)
    step = StepInputs(np.arange(6), np.zeros(0, np.int64), np.arange(5), layout, np.zeros((0, 2), np.int64),
                      False, 2, True)
    inputs = StaticInputs(max_tokens=8, max_rows=4, max_blocks_per_seq=4, device=torch.device("cpu"))
    inputs.prev_rows.fill_(3)
    draw = (np.ones(6, np.float32), np.ones(6, np.bool_), np.zeros((6, 2), np.int64))
    inputs.load(Uploader(torch.device("cpu")), step, draw, [])
    assert inputs.prev_rows[:6].tolist() == [-1] * 6


def test_graph_batch_sizes_cover_every_batch():
    assert graph_batch_sizes(512)[:6] == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(512)[-1] == 512
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_graph_steps_without_capture_give_the_eager_engines_tokens(tiny_model, monkeypatch):
    """The graphs' path run eagerly on the CPU (no capture): decode and verify steps through the fixed
    inputs, the lookup of the last step's tokens, the LM head and the plain draw inside the step, and rows
    that ask for logprobs or a top-k taking its logits to the sampler, give the eager engine's tokens:
    greedy, and seeded sampling (the same noise keys), with and without n-gram speculation."""
    from conftest import random_prompts

    from nanovllm import LLM, SamplingParams
    from nanovllm.engine.model_runner import ModelRunner

    path, _ = tiny_model("qwen3")
    pattern = random_prompts([12], seed=81)[0]
    prompts = [pattern * 4 + tail for tail in random_prompts([3, 7, 5], seed=82)]  # 3 rows: a graph pads to 4
    plain = [SamplingParams(temperature=t, seed=s, max_tokens=20, ignore_eos=True)
             for t, s in ((0, None), (0.05, 5), (1.5, 6))]  # every step drawn inside the graph
    mixed = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0.8, seed=7, top_k=40, max_tokens=20, ignore_eos=True),
             SamplingParams(temperature=1.5, seed=8, max_tokens=20, ignore_eos=True)]  # by the sampler
    spec = dict(method="ngram", num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=4)

    def tokens(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for params in (plain, mixed)
                for o in llm.generate(prompts, params, use_tqdm=False)]

    for speculative in (None, spec):
        eager = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_seqs=8, speculative_config=speculative)
        assert eager.model_runner.graphs is None
        with monkeypatch.context() as m:
            m.setattr(ModelRunner, "_capture_graphs", lambda self: self.decode_graphs(capture=False))
            graphed = LLM(path, skip_tokenizer_init=True, device="cpu", max_num_seqs=8,
                          speculative_config=speculative)
        graphed.overlap_steps = True  # as on a GPU: a step (plain, or verifying guesses) launches before the last
        # one is read back
        assert tokens(graphed) == tokens(eager)
        replays = graphed.model_runner.graphs.replays
        assert replays[4, 1] > 0 and (speculative is None or replays[4, 4] > 0), replays
