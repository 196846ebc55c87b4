"""Multi-step questions about shapes scenes, their step-by-step solutions, and step labels for a critic.

Two kinds of question, each answered in three steps separated by blank lines (the critic's step separator):

- ``compare``: "Are there more red or blue objects?" — count one colour, count the other, answer
  (``2 red objects`` ⏎⏎ ``1 blue object`` ⏎⏎ ``Answer: red``). Scenes hold 1–3 objects of each of the two
  colours (never as many of one as of the other) and at most one of a third, each in its own cell of the
  3×3 grid, shapes drawn freely.
- ``locate``: "Where is the circle?" — find the object by its shape and say its colour, say its region, answer
  (``the circle is red`` ⏎⏎ ``the red circle is at the top`` ⏎⏎ ``Answer: top``), on
  :meth:`~lit_internvl.data.shapes.world.ShapesWorld.scene`'s scenes (no two objects alike in colour or shape).

A corrupted solution gets one step wrong (a wrong count; a wrong colour or a wrong region) and continues from
it consistently, so its final answer may or may not be right. Labels come from the scene: a step is ``+``
when it and every step before it are true (VisualPRM's "correct up to this step"), so the wrong step and all
after it are ``-``. :class:`ShapesStepsDataModule` serves the policy's solutions (``records: solutions``: SFT, and
the questions as prompts for online RL) and the critic's step-labelled records (``records: steps``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from torch.utils.data import DataLoader, Dataset

from lit_internvl.data.critic import BAD, GOOD, STEP_SEPARATOR
from lit_internvl.data.records import IMAGE_PLACEHOLDER, Record
from lit_internvl.data.samples import SampleBuilder
from lit_internvl.data.shapes.datamodule import ShapesDataModule
from lit_internvl.data.shapes.datasets import ShapesSplit
from lit_internvl.data.shapes.world import COLOURS, REGIONS, SHAPES, ShapeObject, ShapesWorld, Split

ReasoningType = Literal["compare", "locate"]
REASONING_TYPES: tuple[ReasoningType, ...] = get_args(ReasoningType)
StepsRecords = Literal["solutions", "steps"]


def _count(n: int, colour: str) -> str:
    return f"{n} {colour} object{'' if n == 1 else 's'}"


def _compare_scene(world: ShapesWorld, index: int) -> tuple[list[ShapeObject], dict, object]:
    rng = world.rng(index, "compare")
    first, second, third = (str(c) for c in rng.permutation(list(COLOURS))[:3])
    counts = [int(c) for c in rng.permutation([1, 2, 3])[:2]]  # two different counts
    colours = [first] * counts[0] + [second] * counts[1] + [third] * int(rng.integers(2))
    cell = world.image_size / 3
    objects = []
    for colour, where in zip(colours, rng.permutation(9)):
        row, col = divmod(int(where), 3)
        obj = ShapeObject(colour, str(rng.choice(SHAPES)), (0.0, 0.0), float(rng.uniform(0.28, 0.38) * cell))
        slack = cell / 2 - obj.extent - 1  # as ShapesWorld.scene: every drawn pixel inside the object's cell
        x, y = (col + 0.5) * cell + rng.uniform(-slack, slack), (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(replace(obj, centre=(float(x), float(y))))
    return objects, {"colours": (first, second), "counts": counts}, rng


def _compare_steps(colours: tuple[str, str], counts: list[int]) -> list[str]:
    winner = colours[0] if counts[0] > counts[1] else colours[1]
    return [_count(counts[0], colours[0]), _count(counts[1], colours[1]), f"Answer: {winner}"]


def _locate_steps(shape: str, colour: str, region: str) -> list[str]:
    return [f"the {shape} is {colour}", f"the {colour} {shape} is at the {region}", f"Answer: {region}"]


def reasoning(world: ShapesWorld, index: int) -> dict:
    """Question ``index`` of ``world``'s split: ``{image, question, answer, steps, type, facts, objects}`` (``steps``:
    the correct solution; ``facts``: what the steps state, for :func:`corrupted`; ``objects``: the scene's)."""
    kind = REASONING_TYPES[int(world.rng(index, "reasoning").integers(len(REASONING_TYPES)))]
    if kind == "compare":
        objects, facts, rng = _compare_scene(world, index)
        a, b = facts["colours"]
        question, steps = f"Are there more {a} or {b} objects?", _compare_steps(facts["colours"], facts["counts"])
    else:
        objects, rng = world.scene(index)
        target = objects[int(world.rng(index, "locate").integers(len(objects)))]
        facts = {"shape": target.shape, "colour": target.colour, "region": target.region(world.image_size)}
        question, steps = f"Where is the {target.shape}?", _locate_steps(**facts)
    answer = steps[-1].removeprefix("Answer: ")
    image = world.render(objects, rng)
    return {"image": image, "question": question, "answer": answer, "steps": steps, "type": kind, "facts": facts,
            "objects": objects}  # fmt: skip


def corrupted(world: ShapesWorld, index: int, sample: dict) -> tuple[list[str], list[str]]:
    """A solution of ``sample`` (:func:`reasoning`) with one wrong step, continued from it; and its labels from the
    scene (the wrong step and every later one ``-``)."""
    rng, facts = world.rng(index, "corrupt"), sample["facts"]
    wrong = int(rng.integers(2))  # which of the two factual steps
    if sample["type"] == "compare":
        counts = list(facts["counts"])
        # The one count that is neither the true one nor the other colour's (no tie to conclude from).
        counts[wrong] = ({1, 2, 3} - set(counts)).pop()
        steps = _compare_steps(facts["colours"], counts)
    elif wrong == 0:
        colour = str(rng.choice([c for c in COLOURS if c != facts["colour"]]))
        steps = _locate_steps(facts["shape"], colour, facts["region"])
    else:
        region = str(rng.choice([r for r in REGIONS if r != facts["region"]]))
        steps = _locate_steps(facts["shape"], facts["colour"], region)
    return steps, [GOOD] * wrong + [BAD] * (len(steps) - wrong)


def mistakes(world: ShapesWorld, index: int, sample: dict) -> list[list[str]]:
    """Every wrong solution of ``sample`` (:func:`reasoning`) of the kinds a policy makes, each consistent after its
    first wrong step (labels: :func:`label_from_scene`). ``compare``: every other pair of counts 1–3 (a tie
    answered by either colour), and the true counts with the wrong answer. ``locate``: the target given another
    scene object's colour, or its region, or both (the two objects confused); a colour and a region of no
    object in the scene. :func:`corrupted`'s wrong values are drawn at random; these are the ones a model that
    confuses objects or miscounts by one writes."""
    facts = sample["facts"]
    if sample["type"] == "compare":
        colours, true = facts["colours"], tuple(facts["counts"])
        wrong = []
        for counts in ((a, b) for a in (1, 2, 3) for b in (1, 2, 3) if (a, b) != true):
            if counts[0] == counts[1]:
                wrong += [
                    [_count(counts[0], colours[0]), _count(counts[1], colours[1]), f"Answer: {c}"] for c in colours
                ]
            else:
                wrong.append(_compare_steps(colours, list(counts)))
        loser = colours[1] if true[0] > true[1] else colours[0]
        return [*wrong, [*_compare_steps(colours, list(true))[:2], f"Answer: {loser}"]]
    shape, colour, region = facts["shape"], facts["colour"], facts["region"]
    others = [o for o in sample["objects"] if o.shape != shape]
    regions = [o.region(world.image_size) for o in others]
    absent = world.rng(index, "mistakes")
    colour_elsewhere = str(absent.choice([c for c in COLOURS if c not in {o.colour for o in sample["objects"]}]))
    empty = [r for r in REGIONS if r not in {region, *regions}]
    wrong = [_locate_steps(shape, colour_elsewhere, region), _locate_steps(shape, colour, str(absent.choice(empty)))]
    for other, where in zip(others, regions):
        wrong += [_locate_steps(shape, other.colour, region), _locate_steps(shape, colour, where),
                  _locate_steps(shape, other.colour, where)]  # fmt: skip
    return wrong


def label_from_scene(sample: dict, steps: list[str]) -> list[str]:
    """Labels of any solution of ``sample`` (:func:`reasoning`), a policy's included: a question has one true
    solution, so step k is ``+`` when the first k + 1 steps are the true solution's (a step past its end is ``-``)."""
    truth = sample["steps"]
    return [GOOD if steps[: k + 1] == truth[: k + 1] else BAD for k in range(len(steps))]


class ShapesSolutions(ShapesSplit):
    """Multi-step questions as conversation records: the question, answered by the correct solution (its steps
    joined by blank lines). ``meta``: type, final answer, question (what Best-of-N's critic reads)."""

    def __init__(self, world: ShapesWorld, size: int, builder: SampleBuilder) -> None:
        super().__init__(world, size)
        self.builder = builder

    def sample(self, index: int) -> dict:
        qa = reasoning(self.world, index)
        turns = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{qa['question']}"},
                 {"from": "gpt", "value": STEP_SEPARATOR.join(qa["steps"])}]  # fmt: skip
        meta = {"type": qa["type"], "answer": qa["answer"], "question": qa["question"]}
        name = f"shapes-steps-{self.world.split}:{index}"
        return self.builder.safe(Record("conversation", name, {"conversations": turns, "meta": meta}, [qa["image"]]))


class ShapesSteps(ShapesSplit):
    """Step-labelled records for the critic: sample ``2q`` is question ``q``'s correct solution (every step ``+``),
    sample ``2q + 1`` its corrupted one; both share ``meta["group"]``, so validation can ask whether the correct
    one scores higher."""

    def __init__(self, world: ShapesWorld, size: int, builder: SampleBuilder) -> None:
        super().__init__(world, size)
        self.builder = builder

    def sample(self, index: int) -> dict:
        q = index // 2
        qa = reasoning(self.world, q)
        steps, labels = (qa["steps"], [GOOD] * len(qa["steps"])) if index % 2 == 0 else corrupted(self.world, q, qa)
        fields = {"question": qa["question"], "steps": steps, "labels": labels,
                  "meta": {"group": f"{self.world.split}:{q}", "type": qa["type"]}}  # fmt: skip
        return self.builder.safe(Record("steps", f"shapes-steps-{self.world.split}:{index}", fields, [qa["image"]]))


class ShapesStepsDataModule(ShapesDataModule):
    """The multi-step shapes data (module docstring): ``records: solutions`` trains a policy to answer step by step
    (the ``conversation`` view, SFT) or gives the questions as prompts (the ``prompt`` view, ``meta`` holding the
    question, its answer and type: :class:`~lit_internvl.stages.RLStage`); ``records: steps`` trains a critic
    (:class:`~lit_internvl.stages.CriticStage`) on correct and corrupted solutions. ``predict`` gives the test
    questions as prompts for both (a critic's run predicts with its policy's data). Other arguments are
    :class:`~lit_internvl.data.ShapesDataModule`'s (84 px tiles and the ``"shapes"`` tokenizer by default, an empty
    system message: the critic's conversation is long enough)."""

    def __init__(
        self,
        records: StepsRecords = "solutions",
        tile_size: int = 84,
        train_size: int = 10_000,
        val_size: int = 500,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        system: str | None = "",
        tokenizer: str = "shapes",
    ) -> None:
        if records not in get_args(StepsRecords):
            raise ValueError(f"Unknown records {records!r}; available: {', '.join(map(repr, get_args(StepsRecords)))}")
        super().__init__(
            records="questions", tile_size=tile_size, train_size=train_size, val_size=val_size, batch_size=batch_size,
            num_workers=num_workers, seed=seed, system=system, tokenizer=tokenizer,
        )  # fmt: skip
        self.steps_records = records

    @property
    def source(self) -> str:
        return f"data.init_args.records {self.steps_records!r} ({type(self).__name__})"

    def offered_views(self) -> frozenset[str]:
        return frozenset({"conversation"} if self.steps_records == "steps" else {"conversation", "prompt"})

    @property
    def question_types(self) -> dict[str, float] | None:
        """For prompts (RL), the chance of a guessed final answer: one of the two colours, one of the nine regions;
        the SFT stage's one-word exact match per type does not apply to three steps."""
        if self.requested is None or not any(view.kind == "prompt" for view in self.requested):
            return None
        return {"compare": 1 / 2, "locate": 1 / len(REGIONS)}

    def _dataset(self, split: Split, size: int, views) -> Dataset:
        world = ShapesWorld(self.hparams.tile_size, self.hparams.seed, split)
        builder = self.sample_builder(split == "train", views)
        steps = self.steps_records == "steps" and not any(view.kind == "prompt" for view in views)
        return (ShapesSteps if steps else ShapesSolutions)(world, size, builder)

    def predict_dataloader(self) -> DataLoader:
        """The test questions as prompts to answer (both records: a critic's run predicts with its policy's data)."""
        return self._loader("test", self.hparams.val_size, self.prompt_views())
