"""PackedBatch: moving and casting a batch keeps the fields that are not image data exact."""
import torch

from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment


def test_to_bf16_casts_images_only():
    times = [999.0, 1.0, 257.0]  # none of 999 and 257 is a bf16 number (they round to 1000, 256)
    doc = [TextSegment([1, 5])] + [ImageSegment(torch.full((3, 2, 2), 0.1 * i), timestep=t)
                                   for i, t in enumerate(times)]
    batch = PackedBatch.from_rows([[doc]], seq_len=2 + 3 * 4, tokens_per_image=4)
    cast = batch.to(dtype=torch.bfloat16)
    assert cast.images.dtype == torch.bfloat16
    assert torch.equal(cast.images, batch.images.to(torch.bfloat16))
    assert cast.timesteps.dtype == torch.float32 and cast.timesteps.tolist() == times
    table = torch.arange(1000)  # e.g. alphas_cumprod, indexed by the timestep
    assert table[cast.timesteps.long()].tolist() == [999, 1, 257]
    for name in ("input_ids", "labels", "modality", "position_ids", "document_ids", "image_ids", "image_is_condition"):
        before, after = getattr(batch, name), getattr(cast, name)
        assert after.dtype == before.dtype and torch.equal(after, before)
