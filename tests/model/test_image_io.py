import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from megafusion.model.config import FusionConfig
from megafusion.model.image_io import ImageTokenizer, image_latent_shape, tokens_per_image
from megafusion.model.patchers import patchify, unpatchify

HIDDEN = 48
SMALL_UNET = dict(unet_channels=(16, 32), unet_layers_per_block=1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def _cfg(**kw):
    base = dict(image_size=32, patch_size=2, **SMALL_UNET)
    base.update(kw)
    return FusionConfig(**base)


def _pixels(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_vae_mode_shapes(vae_dir, patcher):
    cfg = _cfg(image_mode="vae", vae_path=vae_dir, patcher=patcher)
    tok = ImageTokenizer(cfg, HIDDEN)
    assert tok.latent_shape == (4, 16, 16) == image_latent_shape(cfg)
    assert tok.tokens_per_image == 64 == tokens_per_image(cfg)
    latents = tok.encode_images(_pixels())
    assert latents.shape == (2, 4, 16, 16) and not latents.requires_grad
    assert tok.decode_latents(latents).shape == (2, 3, 32, 32)
    tokens, aux = tok.embed(latents, torch.tensor([0.0, 500.0]))
    assert tokens.shape == (2, 64, HIDDEN)
    pred = tok.predict(tokens, aux)
    assert pred.shape == (2, 4, 16, 16)
    assert torch.all(pred == 0)  # zero-initialised output
    # The VAE is frozen, kept in eval mode, and not trainable.
    assert all(not p.requires_grad for p in tok.vae.parameters())
    tok.train()
    assert not tok.vae.training and tok.embedder.training
    vae_ids = {id(p) for p in tok.vae.parameters()}
    trainable = [p for p in tok.parameters() if p.requires_grad]
    assert trainable and not any(id(p) in vae_ids for p in trainable)


def test_vae_latents_follow_the_config_scaling(vae_dir):
    tok = ImageTokenizer(_cfg(image_mode="vae", vae_path=vae_dir), HIDDEN)
    x = _pixels(n=1)
    ref = AutoencoderKL.from_pretrained(vae_dir)
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mean * ref.config.scaling_factor
    torch.testing.assert_close(tok.encode_images(x), z)


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_pixel_mode_round_trip_and_shapes(patcher):
    tok = ImageTokenizer(_cfg(image_mode="pixel", image_size=16, patcher=patcher), HIDDEN)
    assert tok.vae is None
    assert tok.latent_shape == (3, 16, 16) and tok.tokens_per_image == 64
    x = _pixels(n=3, size=16)
    assert torch.equal(tok.decode_latents(tok.encode_images(x)), x)
    tokens, aux = tok.embed(x, torch.tensor([1.0, 2.0, 3.0]))
    assert tokens.shape == (3, 64, HIDDEN)
    assert tok.predict(tokens, aux).shape == (3, 3, 16, 16)


def test_pixel_scale_multiplies_what_the_model_sees_and_decode_undoes_it():
    tok = ImageTokenizer(_cfg(image_mode="pixel", image_size=16, pixel_scale=5.0), HIDDEN)
    x = _pixels(n=2, size=16)
    torch.testing.assert_close(tok.encode_images(x), 5.0 * x)
    torch.testing.assert_close(tok.decode_latents(tok.encode_images(x)), x)
    with pytest.raises(ValueError, match="pixel_scale"):
        _cfg(pixel_scale=0.0).validate()


def test_patchify_raster_order_brute_force():
    n, c, h, w, p = 2, 3, 8, 12, 2
    x = torch.randn(n, c, h, w)
    tokens = patchify(x, p)
    gw = w // p
    assert tokens.shape == (n, (h // p) * gw, c * p * p)
    for k in range(tokens.shape[1]):
        row, col = k // gw, k % gw
        patch = x[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
        assert torch.equal(tokens[:, k], patch.reshape(n, -1))
    assert torch.equal(unpatchify(tokens, p, c, h, w), x)


def test_linear_patcher_token_k_sees_patch_k():
    """Through the module: with the timestep embedding removed and the projection set to
    copy the patch, token k holds patch (k // (w/p), k % (w/p)), and predict inverts it."""
    p, size = 2, 8
    tok = ImageTokenizer(_cfg(image_size=size, patch_size=p), hidden_size=3 * p * p)
    with torch.no_grad():
        tok.embedder.proj.weight.copy_(torch.eye(3 * p * p))
        tok.embedder.proj.bias.zero_()
        tok.embedder.time["mlp"].linear_2.weight.zero_()
        tok.embedder.time["mlp"].linear_2.bias.zero_()
        tok.predictor.proj.weight.copy_(torch.eye(3 * p * p))
        x = _pixels(n=1, size=size)
        tokens, aux = tok.embed(x, torch.tensor([7.0]))
        gw = size // p
        for k in range(tok.tokens_per_image):
            r, col = k // gw, k % gw
            torch.testing.assert_close(tokens[0, k], x[0, :, r * p:(r + 1) * p, col * p:(col + 1) * p].reshape(-1))
        torch.testing.assert_close(tok.predict(tokens, aux), x)


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_learned_position_table_tells_equal_patches_apart(patcher):
    """A flat image gives every patch the same vector, so without position information
    all tokens are equal; image_position=learned adds its own row to each token and
    changes nothing else (same seed: the same patcher weights)."""
    flat = torch.full((2, 3, 16, 16), 0.3)
    t = torch.tensor([100.0, 900.0])
    plain = ImageTokenizer(_cfg(image_size=16, patcher=patcher), HIDDEN, side_seed=5)
    placed = ImageTokenizer(_cfg(image_size=16, patcher=patcher, image_position="learned"), HIDDEN, side_seed=5)
    tokens, _ = plain.embed(flat, t)
    if patcher == "linear":  # the U-Net's zero padding already marks the border patches
        assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))
    table = dict(placed.named_parameters())["embedder.position"]
    assert table.shape == (1, tokens_per_image(placed.cfg), HIDDEN) and table.requires_grad
    moved, _ = placed.embed(flat, t)
    torch.testing.assert_close(moved, tokens + table, rtol=0, atol=1e-6)
    assert len({tuple(row.tolist()) for row in moved[0]}) == moved.shape[1]  # every token its own
    with pytest.raises(ValueError, match="image_position"):
        _cfg(image_position="rope").validate()


def test_sincos_position_table_is_a_trainable_2d_grid():
    """image_position=sincos starts from diffusers' 2D sine-cosine table (DiT's), centred
    over the grid, and trains it. Token k sits at grid row k // w, column k % w: tokens of one column share the half
    of the table that codes the column, tokens of one row the half that codes the row."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    tok = ImageTokenizer(_cfg(image_size=16, patch_size=4, image_position="sincos"), HIDDEN, side_seed=5)
    table = dict(tok.named_parameters())["embedder.position"]
    assert table.requires_grad and table.shape == (1, 4 * 4, HIDDEN)
    dit = get_2d_sincos_pos_embed(HIDDEN, 4, output_type="pt").float()
    torch.testing.assert_close(table[0], dit - dit.mean(0))  # centred: the place, not a shift of every token
    half = HIDDEN // 2
    for k in range(16):
        for j in range(16):
            same_col, same_row = k % 4 == j % 4, k // 4 == j // 4
            assert torch.equal(table[0, k, :half], table[0, j, :half]) == same_col
            assert torch.equal(table[0, k, half:], table[0, j, half:]) == same_row
    assert float(table.detach().pow(2).mean().sqrt()) > 0.25  # a patch embedding's size, not std 0.02
    with pytest.raises(ValueError, match="divisible by 4"):
        ImageTokenizer(_cfg(image_size=16, patch_size=4, image_position="sincos"), 30, side_seed=5)


def test_missing_or_wrong_vae_path_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=str(missing)):
        ImageTokenizer(_cfg(image_mode="vae", vae_path=str(missing)), HIDDEN)
    with pytest.raises(ValueError, match="vae_path"):
        ImageTokenizer(_cfg(image_mode="vae", vae_path=None), HIDDEN)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        ImageTokenizer(_cfg(image_mode="vae", vae_path=str(empty)), HIDDEN)
    other = tmp_path / "unet"
    UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=32,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1).save_pretrained(other)
    with pytest.raises(ValueError, match=str(other)) as err:
        ImageTokenizer(_cfg(image_mode="vae", vae_path=str(other)), HIDDEN)
    assert "\n" not in str(err.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match=str(broken)) as err:
        ImageTokenizer(_cfg(image_mode="vae", vae_path=str(broken)), HIDDEN)
    assert "\n" not in str(err.value)


def test_pipeline_directory_with_vae_subfolder(vae_dir, tmp_path):
    import shutil
    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    tok = ImageTokenizer(_cfg(image_mode="vae", vae_path=str(tmp_path / "pipe")), HIDDEN)
    assert tok.latent_shape == (4, 16, 16)


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_gradients_reach_every_trainable_parameter_and_not_the_vae(vae_dir, patcher):
    torch.manual_seed(0)
    tok = ImageTokenizer(_cfg(image_mode="vae", vae_path=vae_dir, patcher=patcher), HIDDEN)
    # Zero-init blocks gradients upstream of the last layer on the very first step; give
    # it the small nonzero values one optimizer step would.
    last = tok.predictor.proj if patcher == "linear" else tok.predictor.conv_out
    with torch.no_grad():
        last.weight.normal_(std=0.01)
    latents = tok.encode_images(_pixels())
    tokens, aux = tok.embed(latents, torch.tensor([10.0, 900.0]))
    tok.predict(tokens, aux).square().mean().backward()
    trainable = dict((n, p) for n, p in tok.named_parameters() if p.requires_grad)
    assert trainable and all(not n.startswith("vae.") for n in trainable)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tok.vae.parameters())


def test_unet_keeps_the_token_grid_and_embed_predict_are_disjoint():
    tok = ImageTokenizer(_cfg(patcher="unet", image_size=16), HIDDEN)
    lin = ImageTokenizer(_cfg(patcher="linear", image_size=16), HIDDEN)
    assert tok.tokens_per_image == lin.tokens_per_image == 64
    emb = {id(p) for p in tok.embedder.parameters()}
    assert not emb & {id(p) for p in tok.predictor.parameters()}


def test_shared_rope_positions_put_each_image_at_its_first_position():
    """Against a loop over the tokens: two documents in a row, three images, padding.
    "shared" gives every token of an image the smallest position among that image's
    tokens; text keeps its position; "sequential" changes nothing."""
    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
    from megafusion.model.image_rope import rope_positions

    img = lambda: ImageSegment(torch.zeros(3, 4, 4), timestep=0.0)  # noqa: E731
    rows = [[[TextSegment([1, 2, 3]), img(), TextSegment([4])], [TextSegment([5]), img(), img(), TextSegment([6])]],
            [[img(), TextSegment([7, 8])]]]
    batch = PackedBatch.from_rows(rows, seq_len=24, tokens_per_image=4)
    got = rope_positions(batch.position_ids, batch.image_ids, "shared")
    for b in range(2):
        for i in range(24):
            k = int(batch.image_ids[b, i])
            if k < 0:
                want = int(batch.position_ids[b, i])
            else:
                want = min(int(batch.position_ids[b, j]) for j in range(24) if int(batch.image_ids[b, j]) == k)
            assert int(got[b, i]) == want, (b, i)
    assert got[0, 3:7].tolist() == [3, 3, 3, 3] and got[0, 7].item() == 7  # text after an image counts on
    assert torch.equal(rope_positions(batch.position_ids, batch.image_ids, "sequential"), batch.position_ids)
    # No value is read back to the host (it runs on every forward and sampler step; a
    # CUDA sync each time): the meta device has shapes only, so any read, boolean
    # indexing included, raises there.
    meta = [t.to("meta") for t in (batch.position_ids, batch.image_ids)]
    assert rope_positions(*meta, "shared").shape == got.shape
    assert rope_positions(*meta, "2d", grid_width=2).shape == (3, *got.shape)
    with pytest.raises(ValueError, match="image_rope"):
        _cfg(image_rope="3d").validate()


def test_2d_rope_angles_are_rows_and_columns_and_text_keeps_its_1d_rope():
    """image_rope=2d against the closed form: a token's angle at frequency f is
    theta^(-2f/D) times its t, row or column position (stream f % 3), where an image
    starting at p has t = p, row = p + k // w, column = p + k % w for raster index k; a
    text token's angles are its 1D RoPE's, bitwise."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
    from megafusion.model.image_rope import rope_cos_sin, rope_positions

    D, theta, w = 16, 100.0, 3
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * D, num_attention_heads=4, rope_theta=theta))
    img = lambda: ImageSegment(torch.zeros(3, 4, 4), timestep=0.0)  # noqa: E731
    rows = [[[TextSegment([1, 2]), img(), TextSegment([3, 4])]], [[img(), img(), TextSegment([5])]]]
    batch = PackedBatch.from_rows(rows, seq_len=24, tokens_per_image=9)  # 3x3 grids
    h = torch.zeros(2, 24, 4 * D)
    cos, sin = rope_cos_sin(rotary, h, rope_positions(batch.position_ids, batch.image_ids, "2d", grid_width=w))
    plain_cos, plain_sin = rotary(h, batch.position_ids)
    for b in range(2):
        for i in range(24):
            pos, k = int(batch.position_ids[b, i]), int(batch.image_ids[b, i])
            if k < 0:
                assert torch.equal(cos[b, i], plain_cos[b, i]) and torch.equal(sin[b, i], plain_sin[b, i])
                continue
            start = min(int(batch.position_ids[b, j]) for j in range(24) if int(batch.image_ids[b, j]) == k)
            r, c = divmod(pos - start, w)
            stream = [start, start + r, start + c]
            angle = torch.tensor([stream[f % 3] * theta ** (-2 * f / D) for f in range(D // 2)] * 2)
            torch.testing.assert_close(cos[b, i], angle.cos(), rtol=0, atol=1e-5)
            torch.testing.assert_close(sin[b, i], angle.sin(), rtol=0, atol=1e-5)


def _open_blocks(tok, std=0.05):
    """Give the zero-initialised ends of every image-only block (and of the output side)
    the nonzero values training would."""
    with torch.no_grad():
        for name, param in tok.named_parameters():
            if ".to_out." in name or ".ff.net.2." in name or name in ("predictor.proj.weight",
                                                                       "predictor.conv_out.weight"):
                param.normal_(std=std)


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_patcher_layers_start_as_the_plain_patcher_then_mix_one_image_and_no_other(patcher):
    """model.patcher_layers: at first the input side gives the plain patcher's tokens
    bitwise (same seed: the same patch weights; the blocks start as the identity) and the
    prediction is exactly 0. Once the blocks' ends are nonzero, changing one patch of
    image 0 changes every token of image 0 (without the blocks, linear: token 0 only) and
    none of image 1; on the output side, changing token 0's hidden state moves every pixel
    of image 0 and none of image 1."""
    hidden, size, p = 64, 8, 2
    t = torch.tensor([300.0, 700.0])
    cfg = dict(image_size=size, patch_size=p, patcher=patcher, image_position="sincos")
    tok = ImageTokenizer(_cfg(**cfg, patcher_layers=1), hidden, side_seed=3)
    plain = ImageTokenizer(_cfg(**cfg), hidden, side_seed=3)
    x = _pixels(n=2, size=size)
    poked = x.clone()
    poked[0, :, :p, :p] += 0.5  # patch (0, 0) of image 0
    tokens, aux = tok.embed(x, t)
    assert torch.equal(tokens, plain.embed(x, t)[0])
    assert torch.equal(tok.predict(tokens, aux), torch.zeros_like(x))
    if patcher == "linear":
        base = plain.embed(poked, t)[0] - plain.embed(x, t)[0]
        assert bool((base[0, 0].abs() > 0).any()) and torch.equal(base[0, 1:], torch.zeros_like(base[0, 1:]))
    _open_blocks(tok)
    tokens, aux = tok.embed(x, t)
    moved = tok.embed(poked, t)[0] - tokens
    assert torch.equal(moved[1], torch.zeros_like(moved[1]))
    assert bool((moved[0].abs().amax(-1) > 1e-4).all())  # every token of image 0
    h = torch.randn(2, tok.tokens_per_image, hidden, generator=torch.Generator().manual_seed(1))
    h2 = h.clone()
    h2[0, 0] += torch.randn(hidden, generator=torch.Generator().manual_seed(2))
    delta = tok.predict(h2, aux) - tok.predict(h, aux)
    assert torch.equal(delta[1], torch.zeros_like(delta[1]))
    assert bool((delta[0].abs().amax(0) > 1e-5).all())  # every pixel of image 0


def test_patcher_layers_train_every_weight_and_sides_build_alone():
    """Gradients reach every parameter of both sides' blocks, timestep embedding and
    tables; a side built alone (a pipeline stage's) equals that side of the whole."""
    cfg = _cfg(image_size=8, patch_size=2, patcher_layers=2, image_position="learned")
    tok = ImageTokenizer(cfg, 64, side_seed=7)
    _open_blocks(tok, std=0.01)
    tokens, aux = tok.embed(_pixels(size=8), torch.tensor([10.0, 900.0]))
    tok.predict(tokens, aux).square().mean().backward()
    named = dict(tok.named_parameters())
    assert any(n.startswith("embedder.blocks.") for n in named) and "predictor.position" in named
    assert "predictor.blocks.time.mlp.linear_1.weight" in named
    for name, param in named.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    alone = ImageTokenizer(cfg, 64, sides=("predictor",), side_seed=7)
    whole = ImageTokenizer(cfg, 64, side_seed=7)
    assert alone.predictor.state_dict().keys() == whole.predictor.state_dict().keys()
    for key, value in alone.predictor.state_dict().items():
        assert torch.equal(value, whole.predictor.state_dict()[key]), key
    with pytest.raises(ValueError, match="divisible by 64"):
        ImageTokenizer(cfg, 48)
    with pytest.raises(ValueError, match="patcher_layers"):
        _cfg(patcher_layers=-1).validate()


def test_patcher_sides_output_leaves_the_input_side_plain():
    """model.patcher_sides=output: with every block opened, the input side still gives the
    plain patcher's tokens bitwise (no blocks there), while the output side's blocks move
    the prediction; an unknown side is refused."""
    hidden, size, p = 64, 8, 2
    t = torch.tensor([300.0, 700.0])
    cfg = dict(image_size=size, patch_size=p, image_position="sincos")
    tok = ImageTokenizer(_cfg(**cfg, patcher_layers=1, patcher_sides="output"), hidden, side_seed=3)
    plain = ImageTokenizer(_cfg(**cfg), hidden, side_seed=3)
    both = ImageTokenizer(_cfg(**cfg, patcher_layers=1), hidden, side_seed=3)
    for model in (tok, both):
        _open_blocks(model)
    x = _pixels(n=2, size=size)
    tokens, aux = tok.embed(x, t)
    assert torch.equal(tokens, plain.embed(x, t)[0])
    assert not torch.equal(both.embed(x, t)[0], tokens)
    with torch.no_grad():
        plain.predictor.proj.weight.copy_(tok.predictor.proj.weight)
    assert not torch.allclose(tok.predict(tokens, aux), plain.predict(tokens, aux))
    with pytest.raises(ValueError, match="patcher_sides"):
        _cfg(patcher_layers=1, patcher_sides="input").validate()


@pytest.mark.parametrize("patcher", ["linear", "unet"])
def test_a_batch_without_images_runs_every_module_and_gives_zero_gradients(vae_dir, patcher):
    """A text-only batch (zero images) through the VAE, both sides' blocks and the prompt
    context: empty outputs of the right shapes, and every trainable parameter gets a
    gradient of exactly zero (not None): it took part, as ZeRO-3 needs every rank's
    modules to (tests/parallel/test_mixed_modality.py runs it on two ranks). Before,
    the blocks failed on zero images (diffusers' attention: "cannot reshape tensor of 0
    elements") and the VAE was skipped."""
    cfg = _cfg(image_mode="vae", vae_path=vae_dir, patcher=patcher, patcher_layers=1, prompt_context=True)
    tok = ImageTokenizer(cfg, 64, side_seed=1)
    _open_blocks(tok, std=0.01)
    calls = []
    tok.vae.encoder.register_forward_hook(lambda *a: calls.append("vae"))
    latents = tok.encode_images(torch.zeros(0, 3, 32, 32))
    assert latents.shape == (0, *tok.latent_shape) and calls == ["vae"]
    tokens, aux = tok.embed(latents, torch.zeros(0))
    context = torch.zeros(0, 64, requires_grad=True)
    pred = tok.predict(tokens, aux, context)
    assert tokens.shape == (0, tok.tokens_per_image, 64) and pred.shape == (0, *tok.latent_shape)
    pred.square().sum().backward()
    trainable = {n: p for n, p in tok.named_parameters() if p.requires_grad}
    assert any(".blocks." in n for n in trainable) and any("context" in n for n in trainable)
    for name, param in trainable.items():
        assert param.grad is not None and not param.grad.any(), name
    assert context.grad is not None and context.grad.shape == (0, 64)
