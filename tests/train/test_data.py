"""Self-distillation data: batched, left-padded transformers generation gives the target's own greedy
continuations; the batched teacher-forced pass gives exactly etspec's taps, distributions and labels;
the draft vocabulary and length batches follow their stated rules."""

from __future__ import annotations

import pytest
import torch
import transformers

from etspec.fixtures.tiny import (
    random_draft,
    random_target,
    tiny_draft_config,
    tiny_target_config,
    write_target_checkpoint,
)
from etspec.models.checkpoint import load_target
from etspec.models.config import parse_target_config, read_config_json
from etspec.models.greedy import target_greedy
from etspec.models.speculator import Speculator
from etspec.train.data import (
    Sample,
    Sequence,
    Teacher,
    collate,
    distill,
    generate_responses,
    input_embedding,
    length_batches,
    load_hf_target,
)
from etspec.train.vocab import DraftVocab, most_frequent
from tests.conftest import FAMILIES


def test_batched_generation_is_the_targets_greedy_decoding(tmp_path):
    target = random_target("llama", max_seq_len=64, seed=0)
    write_target_checkpoint(tmp_path, tiny_target_config("llama"), target)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (3, 12, 7, 1)]
    # One batch of four lengths: left padding and its attention mask must not change any continuation.
    got = generate_responses(hf, prompts, 12, eos=(), pad_id=0, batch_size=4)
    spec = Speculator(target, random_draft(tiny_draft_config(tiny_target_config("llama")), 0), 1)
    for prompt, seq in zip(prompts, got):
        assert seq.tokens[: seq.prompt_len] == prompt
        assert seq.response == target_greedy(spec, prompt, 12).tokens
    eos = (got[0].response[4],)
    cut = generate_responses(hf, prompts[:1], 12, eos=eos, pad_id=0, batch_size=1)[0]
    assert cut.response == got[0].response[: got[0].response.index(eos[0]) + 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_pass_is_etspecs_target(hf_targets, family):
    """Batched transformers pass == etspec's TargetModel one sequence at a time: taps, final-norm state,
    restricted logits, labels; and the head's embedding is the raw table etspec's draft method reads."""
    cfg = parse_target_config(read_config_json(hf_targets[family]))
    hf = load_hf_target(hf_targets[family], cfg, torch.float32, "cpu")
    target = load_target(hf_targets[family], 32)
    gen = torch.Generator().manual_seed(4)
    seqs = [Sequence(torch.randint(0, 256, (n,), generator=gen).tolist(), p) for n, p in ((23, 5), (9, 2))]
    vocab = DraftVocab(torch.randperm(256, generator=gen)[:100].sort().values, 256)
    samples = distill(hf, seqs, vocab, target.tap_layers, batch_tokens=64)  # one padded batch
    teacher = Teacher(hf, vocab, cfg.final_logit_softcap)
    for seq, sample in zip(seqs, samples):
        n = len(seq.tokens)
        with torch.no_grad():
            h, taps = target.hidden(sample.tokens[None], torch.arange(n), n)
            logits = target.logits(h)[0]
        assert sample.tokens.tolist() == seq.tokens
        torch.testing.assert_close(sample.taps, torch.cat(taps, -1)[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sample.hidden, h[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(teacher(sample.hidden), logits[:, vocab.ids], atol=1e-4, rtol=1e-4)
        pos = torch.arange(n)
        expect = (pos >= seq.prompt_len) & (pos < n - 1) & torch.isin(logits.argmax(-1), vocab.ids)
        assert sample.label_ok.tolist() == expect.tolist()
        assert 0 < int(sample.label_ok.sum()) < n - 1 - seq.prompt_len  # some, not all, argmaxes in vocab
    ids = torch.arange(256)
    assert torch.equal(input_embedding(hf)(ids), target.embed_tokens(ids))  # Gemma: unscaled


def test_draft_vocab_is_the_most_frequent_tokens_with_ties_to_the_lower_id():
    seqs = [torch.tensor([5, 5, 5, 9, 9, 7, 7, 3]), torch.tensor([9, 200])]
    vocab, coverage = most_frequent(seqs, 256, 3)
    assert vocab.ids.tolist() == [5, 7, 9]  # 9: 3, 5: 3, then 7 (2) beats 3 and 200 (1 each)
    assert coverage == 8 / 10
    assert vocab.d2t.tolist() == [5, 6, 7] and vocab.d2t.dtype == torch.int64
    assert torch.equal(torch.arange(3) + vocab.d2t, vocab.t2d.nonzero().flatten())
    vocab, _ = most_frequent(seqs, 256, 6)  # more slots than seen tokens: unseen ids from 0 up
    assert vocab.ids.tolist() == [0, 3, 5, 7, 9, 200]


def test_length_batches_bound_padded_tokens():
    lengths = [5, 30, 7, 8, 31, 6, 100]
    batches = length_batches(lengths, 32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 32 or len(b) == 1
    assert [6] in batches  # longer than the budget: alone
    samples = [
        Sample(torch.arange(n), torch.zeros(n, 6), torch.zeros(n, 2), torch.ones(n, dtype=torch.bool))
        for n in (4, 9)
    ]
    batch = collate(samples)
    assert batch.tokens.shape == (2, 9) and batch.taps.shape == (2, 9, 6)
    assert batch.label_ok[1].all() and not batch.label_ok[0, 4:].any()


def test_target_written_prompts_start_a_user_turn(tmp_path):
    """The target is asked at the start of a user turn; what it writes there (up to its end-of-turn
    token) comes back as text, decoded, deduplicated, and without messages it never finished."""
    from transformers import AutoTokenizer

    from etspec.fixtures.tiny import write_byte_tokenizer
    from etspec.train.data import generate_responses, target_written_prompts, user_turn_prefix

    write_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prefix = user_turn_prefix(tok)
    wrapped = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tok.decode(prefix) + "hi" == wrapped[: len(tok.decode(prefix)) + 2]

    class Echo(torch.nn.Module):
        """A stand-in generator: always writes 'say a b c d' and then the end-of-turn id 2."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, generation_config):
            text = list(b"say a b c d") + [2]
            new = torch.tensor(text[: generation_config.max_new_tokens]).expand(len(input_ids), -1)
            return torch.cat([input_ids, new], dim=1)

    got = target_written_prompts(Echo(), tok, 5, (2,), 0, 4, seed=0)
    assert got == ["say a b c d"]
    assert target_written_prompts(Echo(), tok, 5, (2,), 0, 4, seed=0, max_tokens=6) == []  # unfinished
    seqs = generate_responses(Echo(), [prefix], 20, (2,), 0, 1)
    assert seqs[0].tokens[: len(prefix)] == prefix


def test_target_written_openings_are_plain_prose_from_its_answers(tmp_path):
    """Openings are the first words of a prose sentence of the target's answer to a message it wrote:
    short sentences and code lines are skipped, the cut leaves at least 3 words to continue."""
    from transformers import AutoTokenizer

    from etspec.fixtures.tiny import write_byte_tokenizer
    from etspec.train.data import chat_ids, target_written_openings, user_turn_prefix

    write_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prefix = user_turn_prefix(tok)
    answer = "Hi.\nA = f(a, b, c, d, e, f, g)\nWe grow in the sun all day long"  # within 64 tokens

    class Writer(torch.nn.Module):
        """A stand-in target: a user message at the start of a user turn, `answer` after it."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls: list[list[int]] = []

        def generate(self, input_ids, attention_mask, generation_config):
            self.calls.append(input_ids[0][attention_mask[0].bool()].tolist())
            user_turn = self.calls[-1] == prefix
            text = list(b"tell me about plants" if user_turn else answer.encode()) + [2]
            new = torch.tensor(text[: generation_config.max_new_tokens]).expand(len(input_ids), -1)
            return torch.cat([input_ids, new], dim=1)

    writer = Writer()
    assert target_written_openings(writer, tok, 3, (2,), 0, 8, seed=0) == ["We grow in the sun"]
    assert writer.calls == [prefix, chat_ids(tok, "tell me about plants")]  # the answer to its own message
