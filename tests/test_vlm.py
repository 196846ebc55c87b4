"""VisionLanguageModel: any connector honouring the contract plugs in; image features land exactly on
the <IMG_CONTEXT> slots; a count mismatch is an error that names the sample."""

import pytest
import torch
import torch.nn as nn

from lit_internvl.batch import Images
from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data.collate import pad_ids
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.models import ImageTokenMismatchError, VisionLanguageModel
from lit_internvl.models.vlm import Logits

TOKENIZER = ByteTokenizer()
CONTEXT_ID = TOKENIZER.token_to_id(IMG_CONTEXT)


class PooledConnector(nn.Module):
    """A user's connector: average-pool the patch grid to 2×2 and project. Built as
    ``Connector(vision_dim, text_dim)`` like every connector."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_dim, text_dim)

    def tokens_per_tile(self, num_patches: int) -> int:
        return 4

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n, length, channels = features.shape
        side = int((length - 1) ** 0.5)
        grid = features[:, 1:].transpose(1, 2).reshape(n, channels, side, side)
        pooled = nn.functional.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
        return self.proj(pooled)


def _model(connector_cls=PooledConnector) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision, decoder = InternViT("tiny"), Decoder("tiny")
    return VisionLanguageModel(vision, connector_cls(vision.hidden_size, decoder.hidden_size), decoder, CONTEXT_ID)


def _prompt(tiles: int, tokens_per_tile: int, question: str = "what is it?") -> torch.Tensor:
    text = "<img>" + IMG_CONTEXT * (tiles * tokens_per_tile) + "</img>\n" + question
    return torch.tensor(TOKENIZER.encode(text))


def test_user_connector_forward_and_backward():
    model = _model()
    assert model.tokens_per_tile() == 4 and model.tokens_per_tile(84) == 4  # pooled to 2×2 at any size
    input_ids = torch.stack([_prompt(1, 4), _prompt(1, 4, "and now it?")])
    pixel_values = torch.randn(2, 3, 56, 56)

    logits = model(input_ids, Images.uniform(pixel_values, [1, 1], 4), head=Logits())
    assert logits.shape == (2, input_ids.shape[1], Decoder("tiny").config.vocab_size)
    logits.logsumexp(-1).mean().backward()
    assert model.connector.proj.weight.grad.abs().sum() > 0
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_image_features_are_spliced_at_the_context_slots_in_order():
    model = _model(PixelShuffleMLP)
    tokens = model.tokens_per_tile()  # a 56 px tile: 4×4 patches → 2×2 after pixel shuffle
    assert tokens == 4 and model.tokens_per_tile(84) == 9  # 84 px: 6×6 patches → 3×3
    input_ids, _ = pad_ids([_prompt(2, tokens), _prompt(1, tokens)], TOKENIZER.pad_id)
    pixel_values = torch.randn(3, 3, 56, 56)

    embeds = model.embed(input_ids, Images.uniform(pixel_values, [2, 1], 4))
    features = model.embed_images(pixel_values)
    slots = (input_ids == CONTEXT_ID).nonzero()
    torch.testing.assert_close(embeds[slots[:, 0], slots[:, 1]], features)
    text = input_ids != CONTEXT_ID
    torch.testing.assert_close(embeds[text], model.decoder.embed_tokens(input_ids)[text])


def test_token_count_mismatch_names_the_sample():
    model = _model()
    input_ids = torch.stack([_prompt(1, 4), torch.cat([_prompt(1, 3), torch.tensor([32])])])
    with pytest.raises(ImageTokenMismatchError, match=r"'dog\.jpg#7' has 3 <IMG_CONTEXT> tokens .* give 4"):
        model(input_ids, Images.uniform(torch.randn(2, 3, 56, 56), [1, 1], 4), sample_names=["cat.jpg#1", "dog.jpg#7"])
    with pytest.raises(ImageTokenMismatchError, match="7 <IMG_CONTEXT> tokens"):
        model(input_ids, torch.randn(2, 3, 56, 56))
    with pytest.raises(ImageTokenMismatchError, match="no images"):
        model(input_ids)
