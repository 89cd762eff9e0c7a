"""Issue 16, item 9: runtime input is checked up front with a clear message. Sampling settings (NaN, infinities,
non-integers, bools), prompts (types, invalid UTF-8, lone surrogates, longer than the model's positions unless
windowing is asked for), token ids (floats are refused, not truncated), `stop` given as one string, and the
CLI's `--threads`, `bench --contexts`, `--decode-tokens`; `stream()` refuses bad input before it is iterated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codexmini.runtime import Runtime, SamplingConfig
from codexmini.runtime.inputs import check_prompt_length, check_prompt_text, check_token_ids
from codexmini.runtime.sampling import stream_tokens
from tests.hardening.conftest import run_cli

LONG_PROMPT = " ".join(str(i) for i in range(4000))  # 19,000 characters, thousands of tokens


@pytest.fixture(scope="module")
def rt(tiny_cmx):
    return Runtime(tiny_cmx)


BAD_SAMPLING = [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.5), ("temperature", True),
    ("temperature", "0.7"), ("top_p", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("repetition_penalty", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("max_tokens", 1.5), ("max_tokens", True), ("max_tokens", -1), ("max_tokens", "8"), ("top_k", 2.0),
    ("top_k", False), ("top_k", -1), ("seed", 1.5), ("seed", True), ("seed", -1), ("seed", 2 ** 64),
    ("stop", 5), ("stop", [""]), ("stop", ["ok", 3]), ("stop_at_eos", "yes"), ("window_prompt", 1),
]


@pytest.mark.parametrize("name, value", BAD_SAMPLING, ids=[f"{n}={v!r}" for n, v in BAD_SAMPLING])
def test_bad_sampling_values_are_refused_naming_the_field(rt, name, value):
    cfg = SamplingConfig(**{name: value})
    with pytest.raises(ValueError, match=name):
        cfg.check()
    with pytest.raises(ValueError, match=name):
        rt.stream("def add(a, b):", cfg)  # at the call, before the first piece is asked for


def test_the_defaults_and_reasonable_values_pass():
    SamplingConfig().check()
    SamplingConfig(max_tokens=0, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1, stop=["\n"], seed=0,
                   stop_at_eos=False, window_prompt=True).check()
    SamplingConfig(seed=np.int64(3), max_tokens=np.int32(4), temperature=np.float32(0.5)).check()


def test_a_stop_given_as_a_string_is_one_stop_string(rt):
    assert SamplingConfig(stop="ab").stop == ["ab"]
    cfg = SamplingConfig(max_tokens=12, stop_at_eos=False)
    cfg.stop = "ab"  # set after construction too
    cfg.check()
    assert cfg.stop == ["ab"]
    text = rt.generate("def add(a, b):", SamplingConfig(max_tokens=24, stop_at_eos=False))
    assert len(text) > 4
    piece = text[2:4]  # a two-character stop string that occurs in the text
    as_string = rt.generate("def add(a, b):", SamplingConfig(max_tokens=24, stop_at_eos=False, stop=piece))
    as_list = rt.generate("def add(a, b):", SamplingConfig(max_tokens=24, stop_at_eos=False, stop=[piece]))
    assert as_string == as_list == text[: text.find(piece)]


@pytest.mark.parametrize("prompt, error, message", [
    (b"def \xff\xfe(", ValueError, "not valid UTF-8: byte 4"), ("def \udcff", ValueError, "not valid Unicode"),
    (None, TypeError, "must be a string"), (42, TypeError, "must be a string"),
    (["def"], TypeError, "must be a string"), ("", ValueError, "empty prompt"),
])
def test_bad_prompts_are_refused_before_streaming(rt, prompt, error, message):
    with pytest.raises(error, match=message):
        rt.stream(prompt, SamplingConfig(max_tokens=4))  # not iterated
    with pytest.raises(error, match=message):
        rt.generate(prompt, SamplingConfig(max_tokens=4))


def test_valid_utf8_bytes_are_a_prompt(rt):
    cfg = SamplingConfig(max_tokens=6, stop_at_eos=False)
    assert rt.generate("def add(a, b):".encode(), cfg) == rt.generate("def add(a, b):", cfg)
    assert check_prompt_text("caf\u00e9".encode()) == "caf\u00e9"


def test_a_prompt_past_the_models_positions_is_refused_or_windowed_when_asked(rt):
    limit = rt.config["max_position_embeddings"]
    n = len(rt.tokenizer.encode(LONG_PROMPT, add_special_tokens=False).ids)
    assert n > limit
    with pytest.raises(ValueError, match=f"{n} tokens, but the model has {limit} positions.*window"):
        rt.stream(LONG_PROMPT, SamplingConfig(max_tokens=4))
    session = rt.new_session()
    text = rt.generate(LONG_PROMPT, SamplingConfig(max_tokens=8, stop_at_eos=False, window_prompt=True), session)
    # The prompt's last limit - 8 tokens, then the 8 new ones: the session holds exactly the model's positions.
    assert isinstance(text, str) and session.pos == limit
    assert session.tokens[: limit - 8] == rt.tokenizer.encode(LONG_PROMPT, add_special_tokens=False).ids[-(limit - 8):]
    # Decoding stops where the model's positions end, as at max_tokens: 3 tokens fill them, and the prediction
    # made at the last position is the 4th.
    short = rt.new_session()
    ids = rt.tokenizer.encode(LONG_PROMPT, add_special_tokens=False).ids[: limit - 3]
    got = list(stream_tokens(rt, ids, SamplingConfig(max_tokens=50, stop_at_eos=False), short))
    assert len(got) == 4 and short.pos == limit


def test_check_prompt_length():
    assert check_prompt_length(10, 16) == 10 and check_prompt_length(10, None) == 10
    assert check_prompt_length(10, 16, start=8, window=True) == 8
    with pytest.raises(ValueError, match="after the 8 tokens the session holds"):
        check_prompt_length(10, 16, start=8)


@pytest.mark.parametrize("ids, error", [
    ([1.7, 2.0], TypeError), ([1, 2.0], TypeError), ([True, 2], TypeError), (torch.tensor([1.0, 2.0]), TypeError),
    (torch.tensor([True]), TypeError), (np.array([1.5]), TypeError), ("12", TypeError), (None, TypeError),
    ([1, -1], ValueError), ([1, 10 ** 6], ValueError), ([], ValueError),
])
def test_token_ids_that_would_be_changed_or_overflow_are_refused(ids, error):
    with pytest.raises(error):
        check_token_ids(ids, 300)


def test_integer_token_ids_of_any_kind_pass():
    want = torch.tensor([1, 2, 3])
    for ids in ([1, 2, 3], (1, 2, 3), torch.tensor([[1, 2, 3]]), torch.tensor([1, 2, 3], dtype=torch.int32),
                np.array([1, 2, 3]), [np.int64(1), np.int32(2), 3]):
        assert torch.equal(check_token_ids(ids, 300), want)


def test_stream_tokens_refuses_float_ids_before_it_is_iterated(rt):
    with pytest.raises(TypeError, match="ids\\[0\\] = 1.5"):
        stream_tokens(rt, [1.5, 2.0], SamplingConfig(max_tokens=2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream_tokens(rt, [rt.config["vocab_size"]], SamplingConfig(max_tokens=2))


def test_nan_repetition_penalty_no_longer_produces_text(rt):
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number"):
        rt.generate("def", SamplingConfig(repetition_penalty=math.nan, max_tokens=4))


@pytest.mark.parametrize("args, message", [
    (["--threads", "-3"], "--threads must be >= 1"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number"),
    (["--top-p", "inf"], "top_p must be a finite number"),
    (["--stop", ""], "stop[0]"),
    (["--prompt", LONG_PROMPT], "positions"),
])
def test_cli_generate_refuses_bad_input_in_one_line(tiny_cmx, args, message, capsys):
    argv = ["generate", str(tiny_cmx), "--max-tokens", "4", *(["--prompt", "def"] if "--prompt" not in args else []),
            *args]
    assert run_cli(*argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing printed before the refusal, not even the prompt


def test_cli_generate_windows_a_long_prompt_when_asked(tiny_cmx, capsys):
    assert run_cli("generate", str(tiny_cmx), "--prompt", LONG_PROMPT, "--max-tokens", "4",
                   "--window-prompt") == 0
    assert capsys.readouterr().out.startswith(LONG_PROMPT)


@pytest.mark.parametrize("args, message", [
    (["--contexts", "-5"], "--contexts and --decode-tokens must be positive"),
    (["--contexts", "8,x"], "comma-separated positive integers"),
    (["--decode-tokens", "0"], "--contexts and --decode-tokens must be positive"),
    (["--threads", "-3"], "--threads must be >= 1"),
    (["--contexts", "600"], "exceed the model's 512 positions"),
])
def test_cli_bench_refuses_bad_parameters(tiny_cmx, args, message, capsys):
    assert run_cli("bench", str(tiny_cmx), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
