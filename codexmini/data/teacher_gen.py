"""Teacher-generated data: what the teacher writes from seed prompts, as training text and as a held-out domain.

On a machine without a dataset hub the teacher is the one source of broad text, and its samples keep what the
student learns close to what the teacher knows (LLM-QAT's data-free distillation). Prompts come from a shipped,
editable list (`seed_prompts.jsonl`: prose, explanation, code, dialogue, lists) or a user file; instruct teachers
get them in their chat template. Decoding is batched (left padding, `generate` on `gen_batch_size` prompts at
once), which on CPU is what makes this affordable.

Samples are cached on disk once: `<cache>/teacher-<key>/chunk-NNNNN.jsonl`, one file per batch, each written
atomically. The key hashes the teacher's weights, the tokenizer, the prompts and every generation setting except
the number of samples, and batch `c` is sampled with its own seed, so an interrupted build continues after the
last complete batch and asking for more samples later only generates the new batches. Identical texts are kept
once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import write_atomic
from .sources import MissingSource

SEED_PROMPTS = Path(__file__).with_name("seed_prompts.jsonl")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("CODEXMINI_DATA_CACHE", Path.home() / ".cache" / "codexmini" / "data"))


# --------------------------------------------------------------------------- prompts
def load_prompts(path: str | Path | None = None, key: str = "data") -> list[dict]:
    """Seed prompts `[{"prompt": str, "kind": str}]` from a .jsonl file (`{"prompt": ..., "kind": ...}` or a bare
    string per line) or any other text file (one prompt per line, `#` comments). None: the shipped list."""
    path = Path(path).expanduser() if path else SEED_PROMPTS
    if not path.is_file():
        raise MissingSource(f"{key}.prompts {str(path)!r}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (path.suffix != ".jsonl" and line.lstrip().startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}.prompts {path}:{n} is not JSON ({err.msg})") from None
            row = {"prompt": row} if isinstance(row, str) else row
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{key}.prompts {path}:{n}: expected {{"prompt": "...", "kind": "..."}}')
            rows.append({"prompt": row["prompt"], "kind": str(row.get("kind", ""))})
        else:
            rows.append({"prompt": line.strip(), "kind": ""})
    unique = list({r["prompt"]: r for r in rows if r["prompt"].strip()}.values())
    if len(unique) < 2:
        raise ValueError(f"{key}.prompts {str(path)!r} holds {len(unique)} distinct prompt(s); need at least 2 (one "
                         "is held out for validation)")
    return unique


def split_prompts(prompts: list[dict], val_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Hold out prompts for validation: within each kind, `val_fraction` of them (at least one where the kind has
    two or more), chosen by a seeded hash of the prompt text, so editing the list moves few prompts across."""
    rank = {p["prompt"]: hashlib.sha256(f"{seed}\0{p['prompt']}".encode()).hexdigest() for p in prompts}
    val = set()
    kinds = sorted({p["kind"] for p in prompts})
    for kind in kinds:
        group = sorted((p["prompt"] for p in prompts if p["kind"] == kind), key=rank.__getitem__)
        if len(group) >= 2:
            val.update(group[: min(len(group) - 1, max(1, round(len(group) * val_fraction)))])
    if not val:  # every kind has a single prompt: hold one out overall
        val.add(min(rank, key=rank.__getitem__))
    return [p for p in prompts if p["prompt"] not in val], [p for p in prompts if p["prompt"] in val]


def render_prompt(tokenizer, prompt: str, chat_template: bool = True) -> tuple[str, bool]:
    """(text to continue, whether tokenizing it adds special tokens): the chat template's user turn plus the
    assistant header when the tokenizer has a template, else the prompt itself."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, False  # the template writes its own special tokens
    return prompt, True


# --------------------------------------------------------------------------- fingerprints
def model_fingerprint(model) -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes, bytes): the same weights give the same key
    wherever they were loaded from. About a second per 500 MB on CPU."""
    h = hashlib.sha256(type(model).__name__.encode())
    seen: dict[tuple, str] = {}
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        where = (tensor.device.type, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if where in seen and tensor.numel():  # tied weights: hash the bytes once
            h.update(f"same as {seen[where]}".encode())
            continue
        seen[where] = name
        flat = tensor.cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token,
                        tokenizer.pad_token], default=str)
    return hashlib.sha256((body + extra).encode()).hexdigest()


# --------------------------------------------------------------------------- generation
def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 0.8,
                   top_p: float = 0.95, seed: int = 0, chat_template: bool = True) -> list[dict]:
    """Continue `prompts` in one left-padded `generate` call.

    temperature 0 decodes greedily (then the result equals decoding each prompt alone). Sampling draws from a
    forked RNG seeded with `seed`, so the global torch RNG is left as it was.

    Returns one record per prompt: {"prompt", "text" (rendered prompt + completion, what is trained on),
    "completion", "new_tokens", "finished" (stopped at EOS)}.
    """
    from transformers import GenerationConfig

    rendered = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=add)["input_ids"] for text, add in rendered]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _stop_ids(model, tokenizer)
    if pad is None or not stop:
        raise ValueError("teacher generation needs a tokenizer with an eos_token (and a pad_token or the eos)")
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    sampling = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                              temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                              top_k=0 if sampling else None, pad_token_id=pad, eos_token_id=sorted(stop))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    model.train(was_training)
    records = []
    for i, (prompt, (text, _)) in enumerate(zip(prompts, rendered)):
        new = out[i, width:].tolist()
        end = next((j for j, t in enumerate(new) if t in stop), len(new))
        completion = tokenizer.decode(new[:end], skip_special_tokens=False)
        records.append({"prompt": prompt, "text": text + completion, "completion": completion, "new_tokens": end,
                        "finished": end < len(new)})
    return records


def teacher_samples(teacher, tokenizer, prompts: list[dict], *, num_samples: int, max_new_tokens: int = 128,
                    temperature: float = 0.8, top_p: float = 0.95, gen_batch_size: int = 16,
                    chat_template: bool = True, seed: int = 0, cache_dir: str | Path | None = None,
                    fingerprint: str | None = None, progress: bool = True, desc: str = "teacher samples"
                    ) -> tuple[list[dict], dict]:
    """`num_samples` samples (prompts cycled in a seeded order), generated once and cached; see the module doc.

    Returns (records with distinct texts, info: key, cache folder, samples generated now / reused, duplicates
    dropped, new tokens and tokens/s of what was generated now).
    """
    if num_samples < 1:
        return [], {"samples": 0}
    batch = max(1, min(gen_batch_size, num_samples))
    use_chat = bool(chat_template and getattr(tokenizer, "chat_template", None))
    settings = {"version": CACHE_VERSION, "teacher": fingerprint or model_fingerprint(teacher),
                "tokenizer": tokenizer_fingerprint(tokenizer), "prompts": [p["prompt"] for p in prompts],
                "chat_template": use_chat, "max_new_tokens": max_new_tokens, "temperature": float(temperature),
                "top_p": float(top_p), "batch_size": batch, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / f"teacher-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "settings.json").is_file():
        write_atomic(folder / "settings.json", json.dumps({**settings, "kinds": [p["kind"] for p in prompts]},
                                                          indent=1))
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    n_chunks = math.ceil(num_samples / batch)
    chunks = [_read_chunk(folder / f"chunk-{c:05d}.jsonl", batch) for c in range(n_chunks)]
    missing = [c for c, rows in enumerate(chunks) if rows is None]
    bar = tqdm(total=n_chunks * batch, initial=(n_chunks - len(missing)) * batch, desc=desc, unit="sample",
               disable=not progress or not missing)
    new_tokens, seconds = 0, 0.0
    for c in missing:
        picked = [prompts[order[i % len(prompts)]] for i in range(c * batch, (c + 1) * batch)]
        t0 = time.perf_counter()
        rows = generate_batch(teacher, tokenizer, [p["prompt"] for p in picked], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed * 1_000_003 + c,
                              chat_template=use_chat)
        seconds += time.perf_counter() - t0
        for row, p in zip(rows, picked):
            row["kind"] = p["kind"]
        write_atomic(folder / f"chunk-{c:05d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        chunks[c] = rows
        new_tokens += sum(r["new_tokens"] for r in rows)
        bar.update(batch)
        bar.set_postfix(tokens_per_s=f"{new_tokens / max(seconds, 1e-9):.1f}")
    bar.close()
    records = [r for rows in chunks for r in rows][:num_samples]
    unique = list({r["text"]: r for r in records}.values())
    info = {"key": key, "cache": str(folder), "samples": len(unique), "generated": len(missing) * batch,
            "reused": (n_chunks - len(missing)) * batch, "duplicates_dropped": len(records) - len(unique),
            "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds if seconds else None}
    return unique, info


def _read_chunk(path: Path, batch: int) -> list[dict] | None:
    """A cached batch, or None when it is missing or unreadable (then it is generated again)."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rows if len(rows) == batch and all(isinstance(r.get("text"), str) for r in rows) else None


def teacher_documents(src, data_cfg, tokenizer, teacher, key: str = "data", progress: bool = True):
    """The teacher source's documents: (train Dataset or None for eval_only, validation Dataset, info).

    Training samples come from the training prompts, validation samples from the held-out prompts
    (`num_samples * val_fraction`, at least one); an eval_only source samples `num_samples` from every prompt.
    """
    import datasets

    if teacher is None:
        raise ValueError(f"{key}.source=teacher needs the teacher model: build_data(cfg, tokenizer, teacher=model) "
                         "(the pipeline passes the run's teacher)")
    if tokenizer is None:
        raise ValueError(f"{key}.source=teacher needs the teacher's tokenizer: build_data(cfg, tokenizer, "
                         "teacher=model)")
    prompts = load_prompts(src.prompts, key)
    val_fraction = src.val_fraction if src.val_fraction is not None else data_cfg.val_fraction
    if src.eval_only:
        train_prompts, val_prompts, n_val = [], prompts, src.num_samples
    else:
        train_prompts, val_prompts = split_prompts(prompts, val_fraction, data_cfg.seed)
        n_val = max(1, round(src.num_samples * val_fraction))
    settings = dict(max_new_tokens=src.max_new_tokens, temperature=src.temperature, top_p=src.top_p,
                    gen_batch_size=src.gen_batch_size, chat_template=src.chat_template, seed=data_cfg.seed,
                    cache_dir=data_cfg.cache_dir, fingerprint=model_fingerprint(teacher), progress=progress)
    info = {"prompts_train": len(train_prompts), "prompts_val": len(val_prompts)}
    train = None
    if train_prompts:
        rows, info["train"] = teacher_samples(teacher, tokenizer, train_prompts, num_samples=src.num_samples,
                                              desc=f"{src.name}: teacher samples (train)", **settings)
        train = datasets.Dataset.from_dict({"text": [r["text"] for r in rows]})
    rows, info["val"] = teacher_samples(teacher, tokenizer, val_prompts, num_samples=n_val,
                                        desc=f"{src.name}: teacher samples (validation)", **settings)
    val = datasets.Dataset.from_dict({"text": [r["text"] for r in rows]})
    return train, val, info
