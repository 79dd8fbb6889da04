"""Does the image generator read each word of its prompt? A counterfactual probe.

For held-out one-object rows of the synthetic task, the denoising loss of the model's
prediction at a fixed noise level is computed twice on the same image and the same noise:
with the row's own caption, and with the caption of the same image but one attribute
(colour, shape, size or position) changed to another value. Both captions come from the
task's own grammar (megafusion.data.synthetic), so they differ in exactly that phrase.

A model that uses the attribute has a lower loss with the true caption, and prefers it
(true loss < counterfactual loss) on most rows; one that ignores the attribute has equal
losses and prefers it on about half of them (the "diffusion classifier" of Li et al.,
2023, at one noise level). The layout of an image is decided at high noise, so the
probe's first noise level is near 1. Generation accuracy needs many sampling steps and
a few minutes on a CPU; this probe takes seconds and says which words are ignored.

    from megafusion import generate as G
    from megafusion.eval.probe import probe_prompt_use
    result = probe_prompt_use(G.load("runs/demo"), read_shards("data/synthetic/train/val", 48))
"""
from __future__ import annotations

import torch

from megafusion.data import synthetic
from megafusion.eval.rows import EvalError

ATTRIBUTES = ("colour", "shape", "size", "position")
# Noise levels as fractions of the objective's timestep range (rectified flow: sigma).
DEFAULT_LEVELS = (0.98, 0.9, 0.7, 0.5)


def caption_of(colour: str, shape: str, size: str, position: str) -> str:
    """The synthetic task's caption of one object (its own grammar)."""
    return f"{synthetic._phrase(colour, shape, size)} {position}"


def counterfactual(meta: dict, attribute: str) -> str:
    """The caption of a one-object row with `attribute` set to the next value of its list
    (cyclically), everything else as it is."""
    obj = dict(meta["objects"][0], position=meta["position"])
    values = {"colour": list(synthetic.COLOURS), "shape": list(synthetic.SHAPES), "size": list(synthetic.SIZES),
              "position": list(synthetic.POSITIONS)}[attribute]
    obj[attribute] = values[(values.index(obj[attribute]) + 1) % len(values)]
    return caption_of(obj["colour"], obj["shape"], obj["size"], obj["position"])


def _probe_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        meta = r.get("meta")
        if not isinstance(meta, dict) or meta.get("kind") != "one" or not meta.get("position"):
            continue
        o = meta["objects"][0]
        if caption_of(o["colour"], o["shape"], o["size"], meta["position"]) != r["caption"]:
            raise EvalError(f"probe: row {r.get('id')}: caption {r['caption']!r} is not the synthetic grammar's for its meta")
        out.append(r)
    if not out:
        raise EvalError("probe: no one-object rows with a position (tools/prepare_data.py synthetic writes them)")
    return out


@torch.no_grad()
def _clean_and_noise(gen, rows: list[dict], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' images as the model sees them (float32 latents) and seeded noise: what
    both probes start from."""
    from megafusion.generate import _pixels

    from megafusion.eval.run_shapes import _image

    model = gen.model
    pixels = torch.stack([_pixels(gen, _image(r)) for r in rows])
    x0 = model.image_tokenizer.encode_images(pixels.to(device=gen.device, dtype=model.image_token_embed.dtype)).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed))).to(x0.device)
    return x0, noise


def _timestep(objective, level: float) -> float:
    """The timestep at noise `level` (a fraction of the schedule), as training draws it:
    a DDPM model is trained on whole timesteps (its noising rounds t, but its timestep
    embedding would take 499.5 as given), rectified flow on continuous ones."""
    from megafusion.model.diffusion import DDPMEpsilon

    t = level * (objective.num_train_timesteps - 1)
    return float(round(t)) if isinstance(objective, DDPMEpsilon) else t


@torch.no_grad()
def prompt_losses(gen, captions: list[str], x0: torch.Tensor, noise: torch.Tensor, ts) -> torch.Tensor:
    """Per-image denoising loss [len(ts), N] of the model at each timestep of ts (the
    training loss's own target and prediction), each image prompted by its caption as
    sampling prompts it; the captions are prefilled once for all timesteps."""
    from megafusion.model import inference as inf
    from megafusion.model import tasks

    model = gen.model
    head = [gen.bos] if gen.bos is not None else []
    cache, _ = inf.prefill(model, [head + gen.tokenize(c) + [gen.boi] for c in captions])
    denoise = tasks.cached_denoiser(model, cache)
    out = []
    for t in ts:
        tt = torch.full((x0.shape[0],), float(t), dtype=torch.float32, device=x0.device)
        pred = denoise(model.objective.add_noise(x0, noise, tt), tt).float()
        target = model.objective.target(x0, noise, tt).float()
        out.append(((pred - target) ** 2).flatten(1).mean(1))
    return torch.stack(out)


def probe_prompt_use(gen, rows: list[dict], *, levels=DEFAULT_LEVELS, seed: int = 0, batch: int = 16,
                     progress: bool = True) -> dict:
    """rows: held-out synthetic rows ({image, caption, meta}); one-object rows are used.
    Returns n, levels, and per attribute and level: the mean loss with the true caption,
    with the counterfactual one, and the share of rows on which the true one is lower."""
    rows = _probe_rows(rows)
    model = gen.model
    x0, noise = _clean_and_noise(gen, rows, seed)
    variants = {"true": [r["caption"] for r in rows]}
    variants.update({a: [counterfactual(r["meta"], a) for r in rows] for a in ATTRIBUTES})
    ts = [_timestep(model.objective, lv) for lv in levels]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(variants), desc="probe", leave=False)
    losses = {}
    for name, captions in variants.items():
        per_level = torch.cat([prompt_losses(gen, captions[i:i + batch], x0[i:i + batch], noise[i:i + batch], ts)
                               for i in range(0, len(rows), batch)], dim=1).cpu()
        losses.update({(name, lv): per_level[k] for k, lv in enumerate(levels)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = []
    for a in ATTRIBUTES:
        for lv in levels:
            true, other = losses[("true", lv)], losses[(a, lv)]
            table.append(dict(attribute=a, level=lv, true_loss=float(true.mean()), counterfactual_loss=float(other.mean()),
                              prefers_true=float((true < other).double().mean())))
    return dict(task="probe", n=len(rows), levels=list(levels), seed=seed, table=table)


def ridge_accuracy(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, ridge: float = 10.0) -> float:
    """Held-out accuracy of a linear read-out: features [M, D] standardised on the
    training rows, one-hot least squares with an L2 penalty `ridge` fitted on
    `train` (bool [M]), argmax on the rest."""
    x = features.double()
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    y = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).double()
    a = x[train]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(x.shape[1], dtype=x.dtype), a.T @ y[train])
    return float(((x[~train] @ w).argmax(1) == labels[~train]).double().mean())


@torch.no_grad()
def probe_token_place(gen, rows: list[dict], *, level: float = 0.98, layers=None, seed: int = 0,
                      batch: int = 16) -> dict:
    """Does an image token know where in the image it sits? For held-out rows, each image
    noised to `level` (sigma for rectified flow) and denoised once as sampling does (its
    caption prefilled), a linear read-out of the token's grid index from its hidden state
    is fitted on half the images and scored on the other half, at the image tokens'
    input and after each layer of `layers` (1-based; default 1, a quarter, half, all).
    A token that cannot tell its place cannot draw a shape or put an object where the
    caption says: each decides alone whether to be coloured. Chance is 1/tokens."""
    from megafusion.model import inference as inf

    model = gen.model
    n_layers = len(model.layers)
    layers = sorted(set(layers or (1, max(1, n_layers // 4), max(1, n_layers // 2), n_layers)))
    if not all(1 <= k <= n_layers for k in layers):
        raise EvalError(f"probe: layers {layers} outside 1..{n_layers}")
    if len(rows) < 4:
        raise EvalError(f"probe: {len(rows)} rows; the place read-out needs at least 4 images")
    n_tok = model.tokens_per_image
    x0, noise = _clean_and_noise(gen, rows, seed)
    t = torch.full((len(rows),), _timestep(model.objective, level), device=x0.device)
    x_t = model.objective.add_noise(x0, noise, t).to(model.image_token_embed.dtype)
    head = [gen.bos] if gen.bos is not None else []
    feats = {k: [] for k in (0, *layers)}
    for i in range(0, len(rows), batch):
        cache, _ = inf.prefill(model, [head + gen.tokenize(r["caption"]) + [gen.boi] for r in rows[i:i + batch]])
        outs = []
        inf.forward_tokens(model, inf.image_batch(x_t[i:i + batch], t[i:i + batch], n_tok), cache, store=False,
                           layer_outputs=outs)
        for k in feats:  # only image tokens here, in image order
            feats[k].append(outs[k].float().cpu())
    labels = torch.arange(n_tok).repeat(len(rows))
    train = torch.arange(len(rows) * n_tok) < (len(rows) // 2) * n_tok
    table = [dict(layer=k, accuracy=ridge_accuracy(torch.cat(feats[k]), labels, train)) for k in feats]
    return dict(n=len(rows), level=level, tokens=n_tok, chance=1.0 / n_tok, table=table)


def format_probe(result: dict) -> str:
    from megafusion.eval.rows import table

    rows = [[r["attribute"], f"{r['level']:.2f}", f"{r['true_loss']:.4f}", f"{r['counterfactual_loss']:.4f}",
             f"{r['prefers_true']:.2f}"] for r in result["table"]]
    head = (f"probe: n={result['n']} one-object rows, seed={result['seed']}: denoising loss with the true caption "
            "and with one attribute changed (same image, same noise); prefers true 0.5 = the attribute is ignored")
    out = head + "\n" + table(rows, ["attribute", "t/T", "true loss", "changed loss", "prefers true"])
    place = result.get("place")
    if place:
        cells = [["input" if r["layer"] == 0 else f"after layer {r['layer']}", f"{r['accuracy']:.2f}"]
                 for r in place["table"]]
        out += (f"\n\nplace: does an image token know its cell of the {place['tokens']}-token grid? A linear read-out "
                f"of the cell from its hidden state at t/T {place['level']:.2f}, held-out accuracy (n={place['n']} "
                f"images; chance {place['chance']:.2f}, a DiT-like model 1.00)\n"
                + table(cells, ["hidden state", "accuracy"]))
    return out
