"""Text preservation: an export's text logits are its base model's (the LMFusion claim),
perplexities computed here with plain transformers agree, and a changed text tower shows."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from megafusion.eval.rows import EvalError
from megafusion.eval.text import BUILTIN_CORPUS, load_corpus, text_preservation


def base_perplexity(base_dir, texts):
    """exp(mean token NLL) of the base, from transformers' own loss."""
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[1] + tok(t, add_special_tokens=False)["input_ids"]])
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    return math.exp(nll / n), n


def test_export_logits_equal_the_base(tiny_export, tiny_llama):
    texts = list(BUILTIN_CORPUS[:4])
    result = text_preservation(str(tiny_export), tiny_llama, texts, progress=False)
    ppl, n = base_perplexity(tiny_llama, texts)
    assert result["max_abs_logit_diff"] <= 1e-5
    assert result["tokens"] == n and result["documents"] == 4 and result["tokenizers_agree"]
    assert result["base_perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert result["model_perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert result["model_perplexity_with_image_tokens"] >= result["model_perplexity"]
    assert len(result["samples"]) == 4


def test_a_changed_text_tower_shows(tmp_path, tiny_llama):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from eval_models import export, make_fused

    fused = make_fused(tiny_llama)
    with torch.no_grad():
        fused.layers[0].text.mlp.down_proj.weight.mul_(1.5)
    out = export(fused, tiny_llama, tmp_path / "changed")
    result = text_preservation(str(out), tiny_llama, list(BUILTIN_CORPUS[:2]), progress=False)
    assert result["max_abs_logit_diff"] > 1e-3
    assert result["model_perplexity"] != pytest.approx(result["base_perplexity"], rel=1e-6)


def test_corpus_and_refusals(tmp_path, tiny_export):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one"}\n\n{"text": "two three"}\n')
    assert load_corpus(str(corpus)) == ["one", "two three"]
    assert load_corpus(None, 3) == list(BUILTIN_CORPUS[:3])
    (tmp_path / "bad.jsonl").write_text('{"words": "x"}\n')
    with pytest.raises(EvalError, match="bad.jsonl: line 1 has no 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"))
    with pytest.raises(EvalError, match="--base .*no such file"):
        text_preservation(str(tiny_export), str(tmp_path / "nobase"), ["x y"], progress=False)
    with pytest.raises(EvalError, match="--model"):
        text_preservation(str(tmp_path / "nomodel"), "x", ["x y"], progress=False)
