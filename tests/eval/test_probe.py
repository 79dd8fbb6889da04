"""The prompt-use probe: its counterfactual captions change exactly one attribute (read
back by the analyser's own caption parser), its loss is the training forward's diffusion
loss, its aggregation follows an oracle, and the CLI writes every field."""
from __future__ import annotations

import json

import pytest
import torch

from megafusion import generate as G
from megafusion.data.synthetic import synthetic_samples
from megafusion.eval import probe as P
from megafusion.eval.shapes import analyse, parse_caption


def _one_object_rows(n=40, size=32):
    rows = [dict(id=s.id, image=s.image, caption=s.caption, meta=s.meta) for s in synthetic_samples(0, n, size, "val")]
    return [r for r in rows if r["meta"]["kind"] == "one"]


@pytest.mark.parametrize("attribute", P.ATTRIBUTES)
def test_counterfactual_changes_exactly_that_attribute(attribute):
    for r in _one_object_rows():
        o, said_true = r["meta"]["objects"][0], parse_caption(r["caption"])
        assert said_true["objects"] == [(o["colour"], o["shape"], o["size"])] and said_true["position"] == r["meta"]["position"]
        said = parse_caption(P.counterfactual(r["meta"], attribute))
        (colour, shape, size), = said["objects"]
        now = dict(colour=colour, shape=shape, size=size, position=said["position"])
        before = dict(o, position=r["meta"]["position"])
        assert [k for k in P.ATTRIBUTES if now[k] != before[k]] == [attribute]


@pytest.fixture(scope="module")
def gen(tiny_export):
    return G.load(tiny_export)


def test_probe_loss_is_the_training_forward_loss(gen):
    """prompt_losses (prefilled prompt, cached denoiser) against the model's training
    forward on a generation sample of the data pipeline's layout, one image per batch."""
    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment

    model = gen.model
    captions = ["a red circle in the top left", "a large blue square at the bottom"]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, *model.image_tokenizer.latent_shape, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = 700.0
    got = P.prompt_losses(gen, captions, x0, noise, [t])[0]
    for i, c in enumerate(captions):
        doc = [TextSegment([gen.bos] + gen.tokenize(c) + [gen.boi]), ImageSegment(x0[i], timestep=t),
               TextSegment([gen.eoi, gen.eos])]
        batch = PackedBatch.from_rows([[doc]], seq_len=64, tokens_per_image=model.tokens_per_image)
        with torch.no_grad():
            out = model(batch, noise=noise[i:i + 1])
        torch.testing.assert_close(got[i], out.diffusion_loss, rtol=1e-4, atol=1e-6)


def test_probe_follows_an_oracle_that_reads_colour_only(monkeypatch, gen):
    """A stand-in model whose loss is 0 when the prompt names the colour the analyser sees
    in the image and 1 otherwise: it prefers the true caption on every row for colour and
    on none for the attributes it ignores (equal losses are no preference)."""
    def oracle(gen_, captions, x0, noise, ts):
        pixels = gen_.model.image_tokenizer.decode_latents(x0)
        seen = [analyse(G.to_pil(p)) for p in pixels]
        losses = torch.tensor([0.0 if d and parse_caption(c)["objects"][0][0] == d[0].colour else 1.0
                               for c, d in zip(captions, seen)])
        return losses.expand(len(ts), -1)

    monkeypatch.setattr(P, "prompt_losses", oracle)
    result = P.probe_prompt_use(gen, _one_object_rows(60, 16), levels=(0.9,), progress=False)
    prefers = {r["attribute"]: r["prefers_true"] for r in result["table"]}
    assert prefers["colour"] >= 0.95, prefers
    assert prefers["shape"] == prefers["size"] == prefers["position"] == 0.0


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_probes_ask_at_timesteps_training_draws(monkeypatch, gen, val_shards, objective):
    """A DDPM model is trained on whole timesteps (training draws integers in 1..T-1);
    the probes asked it at level x (T - 1), e.g. 499.5, which its noising rounds and its
    timestep embedding does not. Rectified flow is trained on continuous t."""
    from megafusion.eval.rows import read_shards
    from megafusion.model import diffusion, inference

    model = gen.model
    obj = diffusion.DDPMEpsilon() if objective == "ddpm" else diffusion.RectifiedFlow(1000)
    trained = obj.sample_timesteps(torch.zeros(64, dtype=torch.bool), cap=0, generator=torch.Generator().manual_seed(0))
    whole = bool((trained == trained.round()).all())
    assert whole == (objective == "ddpm")
    monkeypatch.setattr(model, "objective", obj)
    asked = []
    monkeypatch.setattr(P, "prompt_losses", lambda g, c, x0, n, ts: (asked.extend(ts), torch.zeros(len(ts), len(c)))[1])
    P.probe_prompt_use(gen, _one_object_rows(8, 16), levels=(0.98, 0.7, 0.5), progress=False)
    image_batch = inference.image_batch
    monkeypatch.setattr(inference, "image_batch", lambda x, t, n: (asked.extend(t.tolist()), image_batch(x, t, n))[1])
    P.probe_token_place(gen, read_shards(val_shards, 4), layers=(1,))
    assert len(asked) > 3
    assert all((t == round(t)) == whole for t in asked), asked


def test_probe_cli_writes_every_field(tmp_path, tiny_export, val_shards, capsys):
    from megafusion.eval.cli import main

    out = tmp_path / "probe.json"
    assert main(["probe", "--model", str(tiny_export), "--data", val_shards, "--levels", "0.9,0.5", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prefers true" in printed
    result = json.loads(out.read_text())
    assert result["command"] == "probe" and result["levels"] == [0.9, 0.5] and result["n"] >= 1
    assert len(result["table"]) == len(P.ATTRIBUTES) * 2
    for row in result["table"]:
        assert set(row) == {"attribute", "level", "true_loss", "counterfactual_loss", "prefers_true"}
        assert 0 <= row["prefers_true"] <= 1 and row["true_loss"] > 0
    place = result["place"]
    assert place["level"] == 0.9 and place["chance"] == 1 / place["tokens"]
    assert [r["layer"] for r in place["table"]][0] == 0 and all(0 <= r["accuracy"] <= 1 for r in place["table"])
    assert "know its cell" in printed
    assert main(["probe", "--model", str(tiny_export), "--data", val_shards, "--levels", "1.5"]) == 2
    assert "--levels 1.5" in capsys.readouterr().err


def test_ridge_read_out_finds_a_linear_code_and_nothing_in_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(16).repeat(40)
    train = torch.arange(labels.numel()) < 20 * 16
    coded = 3 * torch.nn.functional.one_hot(labels, 16).float() @ torch.randn(16, 64, generator=g)
    assert P.ridge_accuracy(coded + 0.1 * torch.randn(coded.shape, generator=g), labels, train) == 1.0
    # Features independent of the label: held-out accuracy near chance (1/16).
    assert P.ridge_accuracy(torch.randn(labels.numel(), 64, generator=g), labels, train) < 0.15


def test_place_probe_sees_a_position_table_and_no_place_without_one(gen, val_shards):
    """Without a position table a token's input is its noisy patch and the timestep, which
    say nothing of its cell at t/T 0.98 (about chance); with a table of distinct rows
    large against the patch embedding every cell is read from the input exactly."""
    from megafusion.eval.rows import read_shards

    rows = read_shards(val_shards, 16)
    model = gen.model
    n_tok = model.tokens_per_image
    before = P.probe_token_place(gen, rows, layers=(1, len(model.layers)))
    assert before["chance"] == 1 / n_tok and [r["layer"] for r in before["table"]] == [0, 1, len(model.layers)]
    assert before["table"][0]["accuracy"] < 3 / n_tok
    embedder = model.image_tokenizer.embedder
    g = torch.Generator().manual_seed(1)
    embedder.position = torch.nn.Parameter(30 * torch.randn(1, n_tok, model.llama_config.hidden_size, generator=g))
    try:
        after = P.probe_token_place(gen, rows, layers=(1,))
    finally:
        del embedder.position
    assert after["table"][0]["accuracy"] == 1.0
