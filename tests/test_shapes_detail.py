"""The shapes world's fine-detail variant: a seeded share of scenes holds small objects in the 4×4 grid of the 16-token
tile (a token each), the rest large ones in the quadrants of the 4-token tile, with questions every object answers
uniquely, in words the "shapes" tokenizer has."""

import numpy as np
import pytest

from lit_internvl.data.shapes.detail import COUNTS, QUADRANTS, DetailWorld, ShapesDetailDataModule
from lit_internvl.data.shapes.world import COLOURS, SHAPES, vocabulary
from lit_internvl.data.views import View


def test_scenes_are_deterministic_and_fine_at_the_given_ratio():
    world = DetailWorld(112, 0, "val", fine_ratio=0.3)
    assert np.array_equal(
        np.asarray(world.vqa(5)["image"]), np.asarray(DetailWorld(112, 0, "val", 0.3).vqa(5)["image"])
    )
    kinds = [world.detail_scene(i)[1] for i in range(2000)]
    assert abs(kinds.count("fine") / 2000 - 0.3) < 0.03


@pytest.mark.parametrize("index", range(40))
def test_each_object_lies_whole_in_its_own_cell_of_its_kind_of_grid(index):
    world = DetailWorld(112, 0, "train")
    objects, kind, _ = world.detail_scene(index)
    grid = 2 if kind == "coarse" else 4
    cell = 112 / grid
    assert COUNTS[kind][0] <= len(objects) <= COUNTS[kind][1]
    cells = {(int(o.centre[0] // cell), int(o.centre[1] // cell)) for o in objects}
    assert len(cells) == len(objects)  # one object a cell
    for o in objects:
        col, row = int(o.centre[0] // cell), int(o.centre[1] // cell)
        assert col * cell <= o.centre[0] - o.extent and o.centre[0] + o.extent <= (col + 1) * cell
        assert row * cell <= o.centre[1] - o.extent and o.centre[1] + o.extent <= (row + 1) * cell
    assert len({o.colour for o in objects}) == len({o.shape for o in objects}) == len(objects)
    if kind == "fine":
        assert all(o.radius < 28 * 0.31 for o in objects)  # about a patch (14 px) across
    else:
        assert all(o.radius > 56 * 0.27 for o in objects)


def test_answers_are_the_scene_facts_in_the_tokenizer_words():
    world = DetailWorld(112, 1, "train")
    words = set(vocabulary())
    for index in range(200):
        qa = world.vqa(index)
        objects, kind, _ = world.detail_scene(index)
        if qa["type"] == "count":
            assert qa["answer"] == str(len(objects))
        elif qa["type"] == "position":
            assert kind == "coarse" and qa["answer"] in QUADRANTS
        assert all(word in words for word in qa["answer"].split() if not word.isdigit())
        assert qa["detail"] == kind


def test_the_datamodule_gives_the_questions_at_either_budget_with_their_detail():
    data = ShapesDetailDataModule(val_size=4, batch_size=4)
    data.use_views((View("conversation", 16, name="full"), View("conversation", 4, name="small")))
    batch = next(iter(data.val_dataloader()))
    context = data.tokenizer.token_to_id("<IMG_CONTEXT>")
    assert (batch["full"].input_ids == context).sum(1).tolist() == [16] * 4
    assert (batch["small"].input_ids == context).sum(1).tolist() == [4] * 4
    assert {m["detail"] for m in batch["full"].meta} <= {"coarse", "fine"}
    assert data.question_types == {"colour": 1 / 6, "shape": 1 / 5, "count": 1 / 5, "position": 1 / 4}
    with pytest.raises(ValueError, match="fine_ratio"):
        ShapesDetailDataModule(fine_ratio=1.5)


def test_descriptions_name_every_object_in_the_asked_order_in_training_only():
    world = DetailWorld(112, 2, "train")
    described = [world.vqa(i, describe_ratio=1.0) for i in range(30)]
    for i, qa in enumerate(described):
        objects, kind, _ = world.detail_scene(i)
        order = "shape" if qa["question"].endswith("by shape.") else "colour"
        names = [part.split(" at the ")[0][2:] for part in qa["answer"].split(", ")]
        assert sorted(names) == sorted(o.name for o in objects)
        keys = [name.split()[1] if order == "shape" else name.split()[0] for name in names]
        reference = list(SHAPES) if order == "shape" else list(COLOURS)
        assert keys == sorted(keys, key=reference.index)
        assert (" at the " in qa["answer"]) == (kind == "coarse")
    data = ShapesDetailDataModule(describe_ratio=1.0, val_size=4, batch_size=4)
    data.use_views((View("conversation", 16),))
    assert all(m["type"] != "description" for m in next(iter(data.val_dataloader()))["conversation"].meta)
