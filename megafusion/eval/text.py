"""Text preservation: an exported (or checkpointed) megafusion model against its base
model on plain text. LMFusion keeps the text tower frozen and routes text tokens only
through it, so text-only logits should be the base model's exactly, and so should the
perplexity.

The export is read the way users read it: AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True) and its text forward (a run or checkpoint directory goes through
megafusion.generate.load and the training forward instead). The base is loaded as training
loads it (megafusion.model.loading: a Hugging Face directory, a .gguf, or "smollm2").
Both see the same token ids: [BOS] + the text, tokenised without special tokens as the
data pipeline does. Perplexity is over the text vocabulary: the export's two extra
outputs (BOI, EOI) are left out, as text generation bans them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from megafusion.eval.rows import EvalError, progress as _progress, read_jsonl

BUILTIN_CORPUS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window, and the cold morning air filled the small room.",
    "A function that calls itself is called recursive; every recursion needs a base case.",
    "The committee will meet again next Tuesday to review the budget for the coming year.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "He said he would be late, so we started dinner without him.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
)


def load_corpus(path: str | None, max_docs: int | None = None) -> list[str]:
    if path is None:
        texts = list(BUILTIN_CORPUS)
    else:
        texts = [str(r["text"]) for r in read_jsonl(path, "--corpus", required=("text",)) if str(r["text"]).strip()]
        if not texts:
            raise EvalError(f"--corpus {path}: every text is empty")
    return texts[:max_docs] if max_docs else texts


class _ExportText:
    """Text logits of a megafusion model: the export's transformers forward, or the
    training forward of a run / checkpoint directory."""

    def __init__(self, path: str, tag: str | None = None):
        from megafusion import generate as G

        p = Path(path)
        if not p.is_dir():
            raise EvalError(f"--model {path}: no such directory")
        self.hf = None
        if G._is_export(p):
            from transformers import AutoModelForCausalLM

            from megafusion.model.loading import tokenizer_from_dir

            self.hf = AutoModelForCausalLM.from_pretrained(str(p), trust_remote_code=True, dtype=torch.float32).eval()
            self.tokenizer = tokenizer_from_dir(p)  # not AutoTokenizer: see tokenizer_from_dir (transformers 5)
            self.bos = self.hf.config.bos_token_id
            self.vocab_size = self.hf.model.vocab_size
        else:
            try:
                gen = G.load(p, tag=tag)
            except G.GenerateError as exc:
                raise EvalError(str(exc)) from None
            self.gen, self.tokenizer, self.bos, self.vocab_size = gen, gen.tokenizer, gen.bos, gen.model.vocab_size

    def logits(self, ids: list[int]) -> torch.Tensor:
        if self.hf is not None:
            return self.hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        from megafusion.model.batch import PackedBatch, TextSegment

        m = self.gen.model
        batch = PackedBatch.from_rows([[[TextSegment(list(ids))]]], seq_len=len(ids), tokens_per_image=m.tokens_per_image)
        return m(batch, return_logits=True).logits.reshape(len(ids), -1)


def _nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    target = torch.tensor(ids[1:])
    return float(torch.nn.functional.cross_entropy(logits[:-1].double(), target, reduction="sum")), len(ids) - 1


@torch.no_grad()
def text_preservation(model: str, base: str, texts: list[str], *, max_tokens: int = 512, tag: str | None = None,
                      progress: bool = True) -> dict:
    """max |logit difference| (over the text vocabulary) and both perplexities on `texts`."""
    from megafusion.model.loading import BaseModelError, load_base_model, load_tokenizer

    fused = _ExportText(model, tag)
    try:
        base_model = load_base_model(base).eval()
        base_tok = load_tokenizer(base)
    except BaseModelError as exc:
        raise EvalError(f"--base {base}: {str(exc).split(': ', 1)[-1]}") from None
    V = fused.vocab_size
    if base_model.config.vocab_size != V:
        raise EvalError(f"--base {base}: vocabulary of {base_model.config.vocab_size} tokens, the model's base has {V}")
    head = [fused.bos] if fused.bos is not None else []
    max_diff, nll_m, nll_b, nll_full, tokens, agree, docs = 0.0, 0.0, 0.0, 0.0, 0, True, []
    for text in _progress(texts, desc="text", enabled=progress):
        body = list(fused.tokenizer(text, add_special_tokens=False)["input_ids"])
        agree &= body == list(base_tok(text, add_special_tokens=False)["input_ids"])
        ids = (head + body)[:max_tokens]
        if len(ids) < 2:
            continue
        got = fused.logits(ids).float()
        ref = base_model(input_ids=torch.tensor([ids])).logits[0].float()
        diff = float((got[:, :V] - ref).abs().max())
        a, n = _nll(got[:, :V], ids)
        b, _ = _nll(ref, ids)
        nll_full += _nll(got, ids)[0]
        max_diff, nll_m, nll_b, tokens = max(max_diff, diff), nll_m + a, nll_b + b, tokens + n
        docs.append(dict(text=text[:200], tokens=n, max_abs_logit_diff=diff, model_nll=a / n, base_nll=b / n))
    if not tokens:
        raise EvalError("text: no text of at least two tokens in the corpus")
    return dict(task="text", model=str(model), base=str(base), documents=len(docs), tokens=tokens,
                max_tokens=max_tokens, max_abs_logit_diff=max_diff,
                model_perplexity=math.exp(nll_m / tokens), base_perplexity=math.exp(nll_b / tokens),
                model_perplexity_with_image_tokens=math.exp(nll_full / tokens),
                perplexity_ratio=math.exp((nll_m - nll_b) / tokens), tokenizers_agree=bool(agree), samples=docs)


def format_text(result: dict) -> str:
    from megafusion.eval.rows import table

    rows = [["max |logit difference| (text vocabulary)", f"{result['max_abs_logit_diff']:.3g}"],
            ["perplexity, model", f"{result['model_perplexity']:.4f}"],
            ["perplexity, base", f"{result['base_perplexity']:.4f}"],
            ["perplexity, model incl. BOI/EOI outputs", f"{result['model_perplexity_with_image_tokens']:.4f}"],
            ["tokenizers agree", str(result["tokenizers_agree"])]]
    head = f"text: {result['documents']} documents, {result['tokens']} predicted tokens"
    return head + "\n" + table(rows, ["metric", "value"])
