"""Train edgerun's demo model: a small Mixtral-architecture MoE on Tiny Shakespeare, on the CPU.

    python training/train_demo.py                 # tokenizer, model, held-out perplexity (26 min on 2 cores)
    python training/train_demo.py --eval          # held-out perplexity through edgerun: float, q8 and q4

Data. The text is cut once on a character offset: the first 90% (moved forward to the next blank line, so no
speech is cut) trains the tokenizer and the model; the rest is held out for evaluation only. Every speech
("NAME:\\nline\\nline") is followed by the end-of-sequence token `</s>`, so the model learns where a speech
ends and a chat reply stops on its own.

Tokenizer. A byte-level BPE trained with the `tokenizers` library on the training part, special tokens
`<unk>` (0), `<s>` (1, put before every input) and `</s>` (2).

Model. transformers' MixtralForCausalLM (8 experts, top-2), trained from scratch with AdamW, a linear warm-up
and a cosine decay, on windows of `--context` tokens that begin with `<s>` and the start of a speech. A
load-balancing loss on every layer (the Switch Transformer one, per layer rather than pooled over layers)
keeps all experts in use. Seeded: the same command on the same machine gives the same model.

Evaluation. The held-out token stream is read in windows of `--context` tokens (`<s>` then context - 1 text
tokens) that start every `--stride` tokens; the first window scores all its tokens, later ones only those
after the overlap, so every token is scored once and with at least context - stride - 1 tokens before it
(fewer only at the start of the text). Perplexity = exp(mean negative log-likelihood per scored token).

The result is written in Hugging Face format (config.json, model.safetensors in float16,
generation_config.json, tokenizer.json, tokenizer_config.json) with a metrics.json beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE / "tinyshakespeare.txt"
DEFAULT_OUT = HERE.parent / "edgerun" / "data" / "demo-model"
TRAIN_FRACTION = 0.9
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK, BOS, EOS = 0, 1, 2
USER, ASSISTANT, SYSTEM = "ROMEO", "JULIET", "Chorus"

# Every message is a speech: "NAME:\ntext</s>", speeches apart by a blank line. The user speaks as ROMEO, the
# model answers as JULIET, a system message is spoken by the Chorus (as a prologue); a message's optional
# "name" picks another character. Text right after a block tag is written as an expression: templates are rendered
# with trim_blocks, which drops the first newline after a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set who = m.get('name') or '" + USER + "' %}"
    "{% elif m['role'] == 'assistant' %}{% set who = m.get('name') or '" + ASSISTANT + "' %}"
    "{% elif m['role'] == 'system' %}{% set who = m.get('name') or '" + SYSTEM + "' %}"
    "{% else %}{{ raise_exception('roles must be system, user or assistant') }}{% endif %}"
    "{% if not loop.first %}{{ '\n\n' }}{% endif %}{{ who }}:\n{{ m['content'] | trim }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\n\n' }}{% endif %}{{ '" + ASSISTANT + ":\n' }}{% endif %}"
)


# -- data -------------------------------------------------------------------------------------------------------
def split_text(text: str, fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """(training part, held-out part): cut at fraction of the characters, moved on to the next blank line."""
    cut = text.find("\n\n", int(len(text) * fraction))
    if cut < 0:
        cut = len(text)
    return text[:cut], text[cut:]


def speeches(text: str) -> list[str]:
    """The speeches of a play text ("NAME:\\nline\\n..." blocks between blank lines), stripped."""
    return [s.strip("\n") for s in text.split("\n\n") if s.strip()]


def with_eos(text: str) -> str:
    """The text with `</s>` after every speech, the blank lines kept: what the model reads."""
    return "\n\n".join(s + SPECIALS[EOS] for s in speeches(text))


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on the speeches of text, adding `<s>` before every input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((s + "\n\n" for s in speeches(text)), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[BOS]} $A",
                                                       special_tokens=[(SPECIALS[BOS], BOS)])
    assert [tok.token_to_id(s) for s in SPECIALS] == [UNK, BOS, EOS]
    return tok


def encode(encode_text: Callable[[str], list[int]], text: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of with_eos(text), the positions where speeches start), with encode_text(str) -> ids (no
    `<s>`). The blank line before a speech is encoded together with it, as a chat prompt renders it."""
    ids, starts = [], []
    for k, speech in enumerate(speeches(text)):
        body = encode_text(speech)
        piece = encode_text("\n\n" + speech) if k else body
        starts.append(len(ids) + len(piece) - len(body))
        ids.extend(piece)
        ids.append(EOS)
    return np.array(ids, dtype=np.int64), np.array(starts, dtype=np.int64)


# -- evaluation -------------------------------------------------------------------------------------------------
def eval_windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored) over n tokens: windows of context - 1 tokens (after `<s>`), every stride."""
    span = context - 1
    if not 0 < stride <= span:
        raise ValueError(f"stride must be in 1..{span}")
    start = 0
    while True:
        end = min(start + span, n)
        yield start, end, 0 if start == 0 else start + span - stride
        if end >= n:
            return
        start += stride


def perplexity(logits_of: Callable[[list[int]], np.ndarray], ids: np.ndarray, context: int, stride: int,
               limit: int | None = None) -> tuple[float, int]:
    """(perplexity, tokens scored) of ids (at most limit tokens), with logits_of([<s>, ...]) -> [T, V] logits."""
    ids = ids[:limit] if limit else ids
    nll, count = 0.0, 0
    for start, end, first in eval_windows(len(ids), context, stride):
        window = [BOS] + ids[start:end].tolist()
        logp = torch.log_softmax(torch.as_tensor(np.asarray(logits_of(window)), dtype=torch.float64), dim=-1)
        # row j predicts window[j + 1] = ids[start + j]
        rows = torch.arange(first - start, end - start)
        nll -= logp[rows, torch.as_tensor(ids[start + rows.numpy()])].sum().item()
        count += len(rows)
    return math.exp(nll / count), count


# -- model --------------------------------------------------------------------------------------------------------
def model_config(a: argparse.Namespace, vocab_size: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_local_experts=a.experts,
        num_experts_per_tok=a.top_k, max_position_embeddings=a.context, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=a.tie, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None,
        router_aux_loss_coef=a.aux, output_router_logits=False, sliding_window=None, attention_dropout=0.0,
    )


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Mean over layers of E * sum_e f_e * p_e (f: share of the top-k choices, p: mean router probability);
    1 when the routing is uniform."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        share = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / top_k
        losses.append(probs.shape[-1] * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def expert_shares(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[list[float]]:
    """Per layer, the share of top-k choices each expert receives."""
    out = []
    for logits in router_logits:
        chosen = torch.topk(logits.float(), top_k, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=logits.shape[-1]).double()
        out.append((counts / counts.sum()).tolist())
    return out


def batches(ids: np.ndarray, starts: np.ndarray, batch: int, context: int, rng: np.random.Generator):
    """Endless batches [batch, context]: `<s>` then context - 1 tokens from the start of a random speech."""
    starts = starts[starts + context - 1 <= len(ids)]
    while True:
        rows = [np.concatenate(([BOS], ids[s:s + context - 1])) for s in rng.choice(starts, size=batch)]
        yield torch.from_numpy(np.stack(rows))


def lr_at(step: int, a: argparse.Namespace) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(a: argparse.Namespace) -> dict:
    from transformers import MixtralForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    a.context = a.context or 256

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    rng = np.random.default_rng(a.seed)
    text = Path(a.data).read_text(encoding="utf-8")
    train_text, held_text = split_text(text)
    t0 = time.perf_counter()
    tok = train_tokenizer(train_text, a.vocab)

    def enc(t: str) -> list[int]:
        return tok.encode(t, add_special_tokens=False).ids

    train_ids, train_starts = encode(enc, train_text)
    held_ids, _ = encode(enc, held_text)
    print(f"tokenizer: {tok.get_vocab_size()} tokens, {time.perf_counter() - t0:.1f}s; training part "
          f"{len(train_text)} chars = {len(train_ids)} tokens, held out {len(held_text)} chars = "
          f"{len(held_ids)} tokens", flush=True)

    cfg = model_config(a, tok.get_vocab_size())
    model = MixtralForCausalLM(cfg).float()
    model.train()
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: {params / 1e6:.2f}M parameters ({expert_params / 1e6:.2f}M in experts)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": other, "weight_decay": 0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    data = batches(train_ids, train_starts, a.batch, a.context, rng)
    start, seen, log_loss, log_aux, log_n = time.perf_counter(), 0, 0.0, 0.0, 0
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        x = next(data)
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size).float(),
                                               x[:, 1:].reshape(-1))
        aux = balance_loss(out.router_logits, a.top_k)
        loss = ce + a.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += x.numel()
        log_loss, log_aux, log_n = log_loss + ce.item(), log_aux + aux.item(), log_n + 1
        if (step + 1) % a.log_every == 0 or step + 1 == a.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{a.steps}  loss {log_loss / log_n:.3f}  balance {log_aux / log_n:.3f}  "
                  f"lr {lr_at(step, a):.2e}  {seen / elapsed:.0f} tok/s  {elapsed / 60:.1f} min", flush=True)
            log_loss, log_aux, log_n = 0.0, 0.0, 0
    train_seconds = time.perf_counter() - start

    model.eval()
    half = model.to(torch.float16)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    half.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tok, out_dir, a.context)
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    # held-out perplexity and routing of the saved float16 weights, computed in float32 by transformers
    model = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    shares = []

    def logits_of(window: list[int]) -> np.ndarray:
        with torch.no_grad():
            o = model(input_ids=torch.tensor([window]), output_router_logits=True, use_cache=False)
        shares.append(expert_shares(o.router_logits, a.top_k))
        return o.logits[0].numpy()

    ppl, scored = perplexity(logits_of, held_ids, a.context, a.stride, a.eval_tokens)
    mean_shares = np.mean(np.array(shares), axis=0)
    metrics = {
        "parameters": params, "expert_parameters": expert_params, "vocab_size": cfg.vocab_size,
        "steps": a.steps, "batch": a.batch, "context": a.context, "training_tokens": seen,
        "training_seconds": round(train_seconds, 1), "tokens_per_second": round(seen / train_seconds, 1),
        "threads": torch.get_num_threads(), "seed": a.seed,
        "train_chars": len(train_text), "heldout_chars": len(held_text),
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "heldout_perplexity": {"transformers_float32" + _limited(a.eval_tokens): round(ppl, 3)},
        "heldout_tokens_scored": scored,
        "eval_stride": a.stride,
        "expert_share_heldout": {"min": round(float(mean_shares.min()), 4), "max": round(float(mean_shares.max()), 4)},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"held-out perplexity {ppl:.2f} over {scored} tokens; expert shares per layer between "
          f"{mean_shares.min():.3f} and {mean_shares.max():.3f} (uniform {1 / a.experts:.3f})", flush=True)
    return metrics


def _limited(eval_tokens: int | None) -> str:
    """The suffix of a perplexity's name in metrics.json when it covers part of the held-out text only."""
    return f"_first{eval_tokens}" if eval_tokens else ""


def save_tokenizer(tok, out_dir: Path, context: int) -> None:
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(context), indent=2) + "\n")


def tokenizer_config(context: int) -> dict:
    """tokenizer_config.json: the special tokens, `<s>` added before every input, and the chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[BOS], "eos_token": SPECIALS[EOS],
            "unk_token": SPECIALS[UNK], "add_bos_token": True, "add_eos_token": False,
            "model_max_length": context, "chat_template": CHAT_TEMPLATE}


def evaluate(a: argparse.Namespace) -> dict:
    """Held-out perplexity through edgerun of the float model and of its q8 and q4 stores; into metrics.json."""
    import edgerun

    out_dir = Path(a.out)
    text = Path(a.data).read_text(encoding="utf-8")
    _, held_text = split_text(text)
    metrics_file = out_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    results = metrics.setdefault("heldout_perplexity", {})
    context = a.context or json.loads((out_dir / "config.json").read_text())["max_position_embeddings"]
    for quant in a.quants:
        t0 = time.perf_counter()
        # one position more than the windows use: edgerun keeps room for a generated token
        experts, _, dense = quant.partition("-dense-")  # e.g. q4-dense-q4: q4 experts, q4 dense matrices
        model = edgerun.load(out_dir, quant=None if quant == "float" else experts, dense=dense or None,
                             context_length=context + 1)
        ids, _ = encode(lambda t: model.tokenizer.encode(t, add_special_tokens=False), held_text)
        ppl, scored = perplexity(model.logits, ids, context, a.stride, a.eval_tokens)
        results[f"edgerun_{quant}" + _limited(a.eval_tokens)] = round(ppl, 3)
        print(f"{quant}: held-out perplexity {ppl:.3f} over {scored} tokens ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the play text (default: tinyshakespeare.txt here)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the model goes (default: edgerun/data/demo-model)")
    p.add_argument("--eval", action="store_true", help="only evaluate the model in --out through edgerun")
    p.add_argument("--quants", nargs="+", default=["float", "q8", "q4"],
                   choices=["float", "q8", "q4", "q4-dense-q4"])
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=160)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--inter", type=int, default=320, help="expert width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True, help="tie input and output embeddings")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per training and evaluation window (default 256; --eval: the model's)")
    p.add_argument("--stride", type=int, default=128, help="evaluation windows start every STRIDE tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux", type=float, default=0.02, help="weight of the load-balancing loss")
    p.add_argument("--eval-tokens", type=int, default=None, help="evaluate on the first N held-out tokens only")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    problem = None
    if not Path(a.data).is_file():
        problem = f"no text at {a.data}"
    elif a.eval and not (Path(a.out) / "config.json").is_file():
        problem = f"no model to evaluate in {a.out} (config.json is missing)"
    elif not 0 < a.stride < (a.context or 256):
        problem = f"--stride must be between 1 and the context length - 1, got {a.stride}"
    elif not a.eval and importlib.util.find_spec("transformers") is None:
        problem = "training needs transformers: pip install -e \".[dev]\""
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if a.eval:
        evaluate(a)
    else:
        train(a)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
