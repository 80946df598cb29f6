"""Speculative decoding: proposers (n-gram, draft model) and the acceptance rule.

How a speculative step runs (the pieces live where their concept does):

1. `Scheduler._schedule_decode` reserves KV slots for each running sequence's next
   token plus up to k proposed ones, asks the `Proposer` for proposals, and appends
   them to the sequence as uncomputed tokens.
2. `ModelRunner` verifies every sequence's last token and its proposals in ONE forward
   (several query tokens over the cached prefix, like a chunked prefill) and samples
   every one of those positions: row j sees the proposals before it as generated
   tokens (`VerifyRow`), so penalties, min_tokens and seeds hold per position.
3. `Scheduler.update` keeps the proposals up to the first one the target's sample
   disagrees with, plus the target's token there, and rolls the rest back (its one
   owner of rollback): tokens truncated, `num_computed_tokens` lowered, blocks holding
   only rejected tokens freed (`BlockManager.free_tail`); blocks are hashed for prefix
   sharing only once all their tokens are accepted.

Proposers are greedy (a one-hot proposal distribution q). Rejection sampling with a
one-hot q reduces to: draw y from the target's processed distribution p; accept the
proposal x iff y == x (probability p(x) = min(1, p/q)); on rejection y is a draw from
p restricted to tokens != x, which is the normalised residual max(0, p - q). The
sampler's noise for a seeded row is a pure function of (seed, position, token), so a
seeded request gives the same tokens with and without speculation.

On CUDA, verify steps replay CUDA graphs of k + 1 query tokens per row (`DecodeGraphs`,
captured for up to `disable_by_batch_size` rows; a row whose proposals ran short owns fewer
tokens of its k + 1). With prompt lookup they overlap like plain steps: the next step is
scheduled while the last one runs, the proposer guessing that every proposal in flight is
accepted and what the bonus token is (the text's next token); its first token is read on the
device. When `update` rolls a sequence back it also bumps `Sequence.num_rollbacks`, which voids
that sequence's rows in the step launched before the rollback. A draft model reads every
token's value, so its steps run synchronously, like penalty requests.
Above `disable_by_batch_size` running sequences the engine does not speculate (plain
decode steps with CUDA graphs and overlap), since large batches are compute-bound.
"""
