"""Run in a fresh process without megafusion on the path (cwd elsewhere, PYTHONPATH
cleared): load an exported directory with plain transformers and run fixed inputs.

    python hf_load_worker.py EXPORT_DIR INPUTS.pt OUTPUTS.pt [BASE_DIR]

INPUTS.pt: {"batch": PackedBatch fields, "noise": [N, C, h, w], "text_ids": [B, L],
"prompt_ids": [1, L], "max_new_tokens": int}. OUTPUTS.pt gets the training forward's
logits and image predictions, the transformers-style forward's logits, greedy
generate() continuations (and the base model's, with BASE_DIR), and the module files
transformers copied.
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM


def main(export_dir, inputs_path, outputs_path, base_dir=None):
    assert importlib.util.find_spec("megafusion") is None, "megafusion must not be importable here"
    inputs = torch.load(inputs_path, weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    remote = sys.modules[type(model).__module__]
    batch = remote.PackedBatch(**inputs["batch"])
    out = {}
    with torch.no_grad():
        fwd = model.model(batch, noise=inputs["noise"], return_logits=True)
        out["logits"] = fwd.logits
        out["image_prediction"] = fwd.image_prediction
        out["text_logits"] = model(input_ids=inputs["text_ids"]).logits
        n = inputs.get("max_new_tokens", 16)
        prompt = inputs["prompt_ids"]
        out["greedy"] = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)[0].tolist()
        if base_dir:
            base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
            out["base_text_logits"] = base(input_ids=inputs["text_ids"]).logits
            out["base_greedy"] = base.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)[0].tolist()
    out["module_file"] = sys.modules[type(model).__module__].__file__
    out["copied_files"] = sorted(p.name for p in Path(out["module_file"]).parent.glob("*.py"))
    out["megafusion_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "megafusion")
    out["sys_path"] = list(sys.path)
    out["cwd"] = os.getcwd()
    torch.save(out, outputs_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
