"""The server's parts on their own: detokenization, request parsing, templates, the prefix cache, the engine."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from codexmini.runtime import SamplingConfig
from codexmini.runtime.sampling import stream_text, stream_tokens
from codexmini.serve.errors import ApiError
from codexmini.serve.prefix_cache import PrefixCache, common_prefix, pack
from codexmini.serve.protocol import parse_chat, parse_completion
from codexmini.serve.templates import ChatTemplate
from codexmini.serve.tokens import TextStream, TokenText


# --------------------------------------------------------------------------- tokens
@pytest.mark.parametrize("stop", [[], ["s"], ["de", "\n\n"], ["zzz-never"]])
def test_text_stream_equals_the_runtime_stream(runtimes, stop):
    rt = runtimes["hybrid"]
    cfg = SamplingConfig(max_tokens=60, stop=stop, stop_at_eos=False)
    want = "".join(stream_text(rt, "def add(a, b):", cfg))
    ids = rt.tokenizer.encode("def add(a, b):", add_special_tokens=False).ids
    ts, got = TextStream(rt.tokenizer, stop), []
    for tok in stream_tokens(rt, ids, SamplingConfig(max_tokens=60, stop_at_eos=False)):
        piece, stopped = ts.push(tok)
        got.append(piece)
        if stopped:
            break
    else:
        got.append(ts.flush()[0])
    assert "".join(got) == want


def test_text_stream_holds_back_half_characters_and_stop_prefixes(runtimes):
    tok = runtimes["softmax"].tokenizer
    ids = tok.encode("héllo wörld", add_special_tokens=False).ids
    ts = TextStream(tok, ["wör"])
    pieces = [ts.push(i) for i in ids]
    assert all("\ufffd" not in p for p, _ in pieces)
    assert "".join(p for p, _ in pieces) == "héllo " and pieces[-1][1] is True


def test_token_bytes_rebuild_the_text(runtimes):
    tok = runtimes["softmax"].tokenizer
    ids = tok.encode("héllo wörld ✓", add_special_tokens=False).ids
    tt = TokenText(tok)
    assert tt.byte_level
    assert b"".join(tt.lookup(i)[1] for i in ids).decode() == "héllo wörld ✓"


# --------------------------------------------------------------------------- protocol
def test_parse_chat_defaults_and_aliases():
    req = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 5, "top_k": -1, "stop": "x", "logprobs": True}, 300)
    assert req.messages == [{"role": "system", "content": "ab"}]
    p = req.params
    assert (p.max_tokens, p.top_k, p.stop, p.logprobs, p.temperature) == (5, 0, ["x"], 0, 1.0)
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, 300).params.max_tokens is None


def test_parse_completion_defaults():
    req = parse_completion({"model": "m", "prompt": ["hi"], "logprobs": 3, "stream": True,
                            "stream_options": {"include_usage": True}}, 300)
    assert req.prompt == "hi" and req.params.max_tokens == 16 and req.params.logprobs == 3
    assert req.stream and req.include_usage
    assert not parse_completion({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
                                300).include_usage


def test_parse_rejects_bools_for_numbers_and_infinities():
    for value in (True, float("inf"), float("nan")):
        with pytest.raises(ApiError) as e:
            parse_completion({"model": "m", "prompt": "x", "temperature": value}, 300)
        assert e.value.param == "temperature"


# --------------------------------------------------------------------------- templates
def test_templates_written_for_transformers_render_the_same():
    from transformers.utils.chat_template_utils import render_jinja_template

    source = ("{% for m in messages %}{% if m.role == 'user' and loop.index0 % 2 == 0 %}"
              "{{ raise_exception('assistant first?') }}{% endif %}{{ bos_token }}{{ m.role }}: "
              "{{ m.content | tojson }}{% if loop.last %}{% break %}{% endif %}\n{% endfor %}"
              "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    msgs = [{"role": "system", "content": "be \"nice\""}, {"role": "user", "content": "hé"}]
    ours = ChatTemplate(source, "<s>", "</s>").render(msgs)
    theirs = render_jinja_template([msgs], chat_template=source, add_generation_prompt=True, bos_token="<s>",
                                   eos_token="</s>")[0][0]
    assert ours == theirs
    with pytest.raises(ApiError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert e.value.status == 400 and "assistant first?" in e.value.message


@pytest.mark.parametrize("source", ["{{ messages.__class__ }}", "{{ ''.__class__.__mro__ }}",
                                    "{% set x = messages.append(1) %}", "{{ messages[0].update({'a': 1}) }}",
                                    "{{ raise_exception.__globals__ }}", "{{ range(10**6) | list | length }}"])
def test_templates_cannot_reach_internals_or_mutate(source):
    with pytest.raises(ApiError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert e.value.status == 500 and e.value.code in ("chat_template_refused", "chat_template_error")


# --------------------------------------------------------------------------- prefix cache
def test_common_prefix():
    assert common_prefix(pack([1, 2, 3]), pack([1, 2, 4])) == 2
    assert common_prefix(pack([1, 2]), pack([1, 2, 4])) == 2
    assert common_prefix(pack([5]), pack([1])) == 0
    assert common_prefix(pack([]), pack([1])) == 0
    assert common_prefix(pack([256]), pack([1])) == 0  # whole tokens, not bytes: 256 and 1 share a zero byte
    rng = random.Random(0)
    for _ in range(300):  # against the plain definition
        a = [rng.randrange(3) for _ in range(rng.randrange(40))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(40))]
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(pack(a), pack(b)) == want


def _session(rt, ids):
    s = rt.new_session()
    rt.forward(ids, s)
    return s


def test_prefix_cache_softmax_reuses_any_shared_length(runtimes):
    rt = runtimes["softmax"]
    cache = PrefixCache(rt, 1 << 30)
    a = list(range(10, 40))
    logits = {30: rt.forward(a, rt.new_session())}
    cache.insert(_session(rt, a), {}, logits)
    hit = cache.lookup(a[:20] + [5, 6])
    assert hit.cached == 20 and hit.logits is None and hit.session.pos == 20
    hit = cache.lookup(a)  # the whole prompt: its logits were kept
    assert hit.cached == 30 and torch.equal(hit.logits, logits[30])
    assert cache.lookup(a[:30] + [1]).cached == 30
    assert cache.lookup([7, 8, 9]) is None


def test_prefix_cache_linear_resumes_only_at_checkpoints(runtimes):
    rt = runtimes["linear"]
    cache = PrefixCache(rt, 1 << 30, block=8)
    a = list(range(10, 40))
    s = rt.new_session()
    checkpoints = {}
    for start in range(0, 30, 8):
        rt.forward(a[start:start + 8], s)
        if s.pos % 8 == 0:
            checkpoints[s.pos] = rt.checkpoint(s)
    cache.insert(s, checkpoints, {})
    assert cache.lookup(a[:20] + [5]).cached == 16  # the last checkpoint inside the shared 20
    assert cache.lookup(a + [5]).cached == 30  # the whole entry: its own final state
    assert cache.lookup(a).cached == 24  # the whole prompt without its logits: one token must run
    assert cache.lookup(a[:7] + [1]) is None


def test_prefix_cache_budget_lru_and_merging(runtimes):
    rt = runtimes["softmax"]
    one = _session(rt, list(range(10, 30))).nbytes()
    cache = PrefixCache(rt, int(2.5 * one))
    seqs = [[i] + list(range(10, 29)) for i in (1, 2, 3)]
    cache.insert(_session(rt, seqs[0]), {}, {})
    cache.insert(_session(rt, seqs[1]), {}, {})
    assert cache.lookup(seqs[0] + [9]).cached == 20  # seqs[0] is now the most recently used
    cache.insert(_session(rt, seqs[2]), {}, {})  # over budget: seqs[1], the least recent, goes
    assert len(cache) == 2 and cache.bytes <= cache.budget
    assert cache.lookup(seqs[1]) is None and cache.lookup(seqs[2] + [9]).cached == 20
    # a longer sequence that extends a cached one replaces it; a shorter one adds to the longer
    longer = seqs[2] + [40, 41, 42]
    cache.insert(_session(rt, longer), {}, {23: torch.zeros(3)})
    assert len(cache) == 2 and cache.lookup(longer).cached == 23
    cache.insert(_session(rt, seqs[2][:10]), {}, {10: torch.ones(3)})
    assert len(cache) == 2 and torch.equal(cache.lookup(seqs[2][:10]).logits, torch.ones(3))
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_a_zero_budget_caches_nothing(runtimes):
    rt = runtimes["softmax"]
    cache = PrefixCache(rt, 0)
    cache.insert(_session(rt, [5, 6, 7]), {}, {})
    assert len(cache) == 0 and cache.lookup([5, 6, 7, 8]) is None


# --------------------------------------------------------------------------- engine
def test_engine_greedy_equals_the_runtime_and_counts_tokens(runtimes):
    from codexmini.serve.engine import Delta, Engine, Finish
    from codexmini.serve.protocol import GenParams

    rt = runtimes["hybrid"]
    engine = Engine("m", rt, parallel=2, max_queue=0)
    engine.start()
    prompt = rt.tokenizer.encode("class Stack:", add_special_tokens=False).ids

    async def run():
        job = engine.submit(prompt, GenParams(temperature=0, max_tokens=10), 10)
        text, fin = "", None
        while fin is None:
            ev = await job.events.get()
            if isinstance(ev, Delta):
                text += ev.text
            elif isinstance(ev, Finish):
                fin = ev
        return text, fin

    try:
        text, fin = asyncio.run(run())
    finally:
        engine.close()
    assert text == rt.generate("class Stack:", SamplingConfig(max_tokens=10))
    assert fin.prompt_tokens == len(prompt) and fin.completion_tokens <= 10 and fin.cached_tokens == 0


@pytest.mark.parametrize("kind", ["int4", "float"])
def test_decoding_rides_along_with_a_prompt_only_where_every_row_is_exact(kind, runtimes, serve_tokenizer,
                                                                          tmp_path):
    """A request that arrives while another decodes: its prompt runs with the other's next token as a one-row chunk
    of the same forward where the kernels compute every row as alone (`Runtime.exact_rows`: codexmini's int
    kernels), never with torch's float matmuls; both answers equal each request alone either way."""
    from codexmini.export.to_cmx import export_cmx
    from codexmini.quantize import QuantizeConfig, quantize_model
    from codexmini.runtime import Runtime
    from codexmini.serve.engine import Delta, Engine, Finish
    from codexmini.serve.protocol import GenParams
    from tests.serve.conftest import LAYERS, make_model

    if kind == "float":
        rt = runtimes["hybrid"]
    else:
        model, _ = quantize_model(make_model(**LAYERS["hybrid"]), QuantizeConfig(method="rtn", default="int4_g32"))
        rt = Runtime(export_cmx(model, serve_tokenizer, tmp_path / "q.cmx"))
        if rt.kernels != "cmx":
            pytest.skip("codexmini's kernels did not build here")
    calls = []
    prefill = rt.prefill_batch

    def recorded(chunks, sessions):
        calls.append([len(c) for c in chunks])
        return prefill(chunks, sessions)

    rt.prefill_batch = recorded
    texts, n_long = ["def add(a, b):", "class Stack:\n    def push(self, item):"], 200
    engine = Engine("m", rt, parallel=2, max_queue=0)
    engine.start()

    async def run():
        async def answer(job):
            text = ""
            while True:
                ev = await job.events.get()
                if isinstance(ev, Delta):
                    text += ev.text
                elif isinstance(ev, Finish):
                    return text

        # long enough that it is still decoding when the second arrives, even on a busy machine
        first = engine.submit(rt.tokenizer.encode(texts[0], add_special_tokens=False).ids,
                              GenParams(temperature=0, max_tokens=n_long, ignore_eos=True), n_long)
        ev = await first.events.get()  # the first request is decoding now
        second = engine.submit(rt.tokenizer.encode(texts[1], add_special_tokens=False).ids,
                               GenParams(temperature=0, max_tokens=8, ignore_eos=True), 8)
        rest, other = await asyncio.gather(answer(first), answer(second))
        return ev.text + rest, other

    try:
        got = asyncio.run(run())
    finally:
        engine.close()
        del rt.prefill_batch
    mixed = [c for c in calls if 1 in c and max(c) > 1]
    assert bool(mixed) == (kind == "int4" and rt.exact_rows >= sum(calls[-1])), calls
    want = [rt.generate(t, SamplingConfig(max_tokens=n, stop_at_eos=False)) for t, n in zip(texts, (n_long, 8))]
    assert list(got) == want
