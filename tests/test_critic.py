"""The process-reward critic (VisualPRM): its conversation and label mask, step records, one-pass scoring, batched
Best-of-N sampling, the multi-step shapes data, the critic stage and its commands."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lit_internvl.batch import IGNORE_INDEX
from lit_internvl.components import Decoder, InternViT, PixelShuffleMLP
from lit_internvl.data.critic import PRM_SYSTEM_PROMPT, critic_turns, label_ids, split_steps, tokenize_critic
from lit_internvl.data.records import BadRecord, DatasetSpec, SkipCounter, index_records, parse_record, read_record
from lit_internvl.data.samples import SampleBuilder, SampleOptions
from lit_internvl.data.tokenizer import IMG_CONTEXT, ByteTokenizer
from lit_internvl.data.views import View
from lit_internvl.inference import generate
from lit_internvl.inference.best_of_n import majority_vote, sample_n
from lit_internvl.inference.critic import aggregate, critic_batch, monte_carlo_labels, score_steps
from lit_internvl.models import VisionLanguageModel
from lit_internvl.models.vlm import Logits
from lit_internvl.rewards import final_answer
from tests.tiny import records, tiny_vlm

RECORD = {
    "image": "scene.png",
    "question": "Are there more red or blue objects?",
    "steps": ["2 red objects", "3 blue objects", "Answer: blue"],
    "labels": ["+", "-", "-"],
}


def _tiny_model(tokenizer: ByteTokenizer, seed: int = 0) -> VisionLanguageModel:
    return tiny_vlm(tokenizer.token_to_id(IMG_CONTEXT), seed=seed).eval()


# -- the conversation ------------------------------------------------------------------------------------------


def test_three_step_conversation_and_mask_equal_the_hand_written_ones():
    tokenizer = ByteTokenizer()
    turns = critic_turns(RECORD["question"], RECORD["steps"], RECORD["labels"])
    ids, labels = tokenize_critic(turns, tokenizer, "internvl2_5", [2], system="Judge each step.")
    expected = (
        "<|im_start|>system\nJudge each step.<|im_end|>\n"
        "<|im_start|>user\n### Question:\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nAre there more red or blue objects?"
        "\n\n### Solution Process:\n2 red objects<|im_end|>\n<|im_start|>assistant\n+<|im_end|>\n"
        "<|im_start|>user\n3 blue objects<|im_end|>\n<|im_start|>assistant\n-<|im_end|>\n"
        "<|im_start|>user\nAnswer: blue<|im_end|>\n<|im_start|>assistant\n-<|im_end|>\n"
    )
    assert tokenizer.decode(ids) == expected
    # The mask by hand: the byte tokenizer gives one id per character and per special token, so the trained ids
    # are the answer characters right after each "<|im_start|>assistant\n" (and not the <|im_end|> after them).
    header = "<|im_start|>assistant\n"
    ends = [i + len(header) for i in range(len(expected)) if expected.startswith(header, i)]
    positions = [len(tokenizer.encode(expected[:end])) for end in ends]
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert trained == positions
    assert [tokenizer.decode([ids[i]]) for i in trained] == ["+", "-", "-"]
    assert [labels[i] for i in trained] == [ids[i] for i in trained]


def test_the_default_system_prompt_is_visualprms():
    assert PRM_SYSTEM_PROMPT.startswith("You are an advanced AI assistant, designed to serve as a process supervision")
    assert 'Respond with **"+"** if you believe the solution process is correct up to this step.' in PRM_SYSTEM_PROMPT
    tokenizer = ByteTokenizer()
    ids, _ = tokenize_critic(critic_turns("q", ["s"], images=0), tokenizer)
    assert tokenizer.decode(ids).startswith(f"<|im_start|>system\n{PRM_SYSTEM_PROMPT}<|im_end|>\n")


def test_steps_split_on_blank_lines():
    assert split_steps("a\n\nb\nc\n\n\n\nAnswer: d\n") == ["a", "b\nc", "Answer: d"]
    assert final_answer("2 red objects\n\nAnswer: Red.") == "red"
    assert final_answer("no steps answer") == "no steps answer"


# -- records -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"labels": ["+", "-"]}, "malformed record"),  # a label per step
        ({"labels": ["+", "ok", "-"]}, "malformed record"),
        ({"steps": []}, "malformed record"),
        ({"steps": ["a", "", "c"]}, "malformed record"),
        ({"question": 3}, "malformed record"),
        ({"question": "<image> and <image>"}, "placeholder mismatch"),
    ],
)
def test_bad_steps_records_are_named_and_counted(tmp_path, change, reason):
    with pytest.raises(BadRecord, match=f"steps.jsonl:2: {reason}"):
        parse_record({**RECORD, **change}, "steps.jsonl:2")
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, **change}) + "\n")
    skips = SkipCounter()
    items = index_records(DatasetSpec("d", path, tmp_path), strict=False, skips=skips)
    assert len(items) == 1 and skips.counts == {reason: 1}
    with pytest.raises(BadRecord, match="steps.jsonl:2"):
        index_records(DatasetSpec("d", path, tmp_path), strict=True, skips=SkipCounter())


def test_a_steps_record_becomes_the_critic_sample(tmp_path):
    from lit_internvl.data.shapes import ShapesWorld

    ShapesWorld(28).pair(0)["image"].save(tmp_path / "scene.png")
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    record = read_record(index_records(DatasetSpec("d", path, tmp_path), True, SkipCounter())[0])
    assert record.kind == "steps"
    tokenizer = ByteTokenizer()
    options = SampleOptions(tile_size=28, max_tiles=1, use_thumbnail=False)
    sample = SampleBuilder(tokenizer, options, (View("conversation", 1),))(record)["views"]["conversation"]
    turns = critic_turns(RECORD["question"], RECORD["steps"], RECORD["labels"])
    assert sample["input_ids"].tolist() == tokenize_critic(turns, tokenizer, "internvl2_5", [1])[0]
    assert PRM_SYSTEM_PROMPT in tokenizer.decode(sample["input_ids"].tolist())  # no system option: VisualPRM's
    assert sample["meta"]["labels"] == RECORD["labels"] and "steps.jsonl" not in sample["meta"]["group"]


# -- scoring -----------------------------------------------------------------------------------------------------


def test_one_forward_step_scores_equal_growing_prefix_scores():
    tokenizer = ByteTokenizer()
    model = _tiny_model(tokenizer)
    options = SampleOptions(tile_size=model.tile_size, system="Judge.")
    pixels = torch.randn(1, 3, model.tile_size, model.tile_size, generator=torch.Generator().manual_seed(3))
    solutions = [RECORD["steps"], ["1 red object", "Answer: red"]]
    batch = critic_batch(
        tokenizer, options, RECORD["question"], solutions, pixels, model.tokens_per_tile()
    )  # two rows, right-padded
    plus, minus = label_ids(tokenizer)
    scores = score_steps(model, batch, plus, minus)
    assert [len(row) for row in scores] == [3, 2]
    counts = [model.tokens_per_tile()]
    for solution, row in zip(solutions, scores):
        for k in range(1, len(solution) + 1):
            # The k-th prefix alone: question, steps 1..k, the k-1 answers before, ending with the assistant header.
            turns = critic_turns(RECORD["question"], solution[:k])
            ids, labels = tokenize_critic(turns, tokenizer, "internvl2_5", counts, "Judge.")
            prefix = torch.tensor([ids[: max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]])
            with torch.no_grad():
                logits = model(prefix, pixels, head=Logits())[0, -1]
            expected = torch.softmax(logits[[plus, minus]], dim=-1)[0].item()
            assert abs(row[k - 1] - expected) <= 1e-5, (k, row[k - 1], expected)


def test_scoring_reads_every_earlier_answer_as_plus_whatever_the_labels():
    """A steps record's own labels in the context would let a critic copy "-" after "-" (a step is right only when
    all before it are): scoring, and so validation, writes "+" in their place, and scores a labelled record as it
    scores the bare solution."""
    from lit_internvl.inference.critic import as_scored

    tokenizer = ByteTokenizer()
    model = _tiny_model(tokenizer)
    options = SampleOptions(tile_size=model.tile_size, system="Judge.")
    pixels = torch.randn(1, 3, model.tile_size, model.tile_size, generator=torch.Generator().manual_seed(4))
    counts = [model.tokens_per_tile()]
    plus, minus = label_ids(tokenizer)
    ids, labels = tokenize_critic(critic_turns(RECORD["question"], RECORD["steps"], ["+", "-", "-"]), tokenizer,
                                  "internvl2_5", counts, "Judge.")  # fmt: skip
    bare = critic_batch(tokenizer, options, RECORD["question"], [RECORD["steps"]], pixels, model.tokens_per_tile())
    labelled = replace(bare, input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    answers = torch.tensor([labels]) != IGNORE_INDEX
    assert torch.tensor([ids])[answers].tolist() == [plus, minus, minus]
    assert as_scored(labelled, plus).input_ids[answers].tolist() == [plus] * 3
    assert (as_scored(labelled, plus).input_ids[~answers] == torch.tensor([ids])[~answers]).all()
    assert score_steps(model, labelled, plus, minus) == score_steps(model, bare, plus, minus)


def test_aggregates():
    assert aggregate([0.2, 0.8, 0.5]) == pytest.approx(0.5)
    assert aggregate([0.2, 0.8, 0.5], "min") == 0.2 and aggregate([0.2, 0.8, 0.5], "last") == 0.5
    assert aggregate([], "mean") == 0.0
    with pytest.raises(ValueError, match="median"):
        aggregate([0.5], "median")


def test_majority_vote_counts_final_answers():
    responses = ["1 red\n\nAnswer: red", "x\n\nAnswer: blue", "y\n\nAnswer: Blue", "z\n\nAnswer: red."]
    assert majority_vote(responses) == 0  # red 2, blue 2: the answer met first
    assert majority_vote(responses[1:]) == 0  # blue 2, red 1


# -- Best-of-N sampling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.8, 0.9), (0.0, 1.0)])
def test_n_in_one_batch_equal_n_seeded_samplings_and_the_vision_tower_runs_once(temperature, top_p):
    tokenizer = ByteTokenizer()
    model = _tiny_model(tokenizer)
    generator = torch.Generator().manual_seed(1)
    tokens = model.tokens_per_tile()
    prompt = torch.cat([
        torch.randint(0, 256, (1, 5), generator=generator), torch.full((1, tokens), model.image_context_id),
        torch.randint(0, 256, (1, 4), generator=generator),
    ], dim=1)  # fmt: skip
    pixels = torch.randn(1, 3, model.tile_size, model.tile_size, generator=generator)
    calls = []
    hook = model.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    seeds = [11, 12, 13, 14, 15, 16]
    # An end token the model reaches in some rows and not others (rows finish at different steps).
    batched = sample_n(model, prompt, pixels, seeds, max_new_tokens=16, eos_id=40, temperature=temperature,
                       top_p=top_p)  # fmt: skip
    assert calls == [1], "the vision tower ran once, on the one tile of the prompt"
    hook.remove()
    for seed, row in zip(seeds, batched):
        alone = generate(model, prompt, None, pixels, max_new_tokens=16, eos_id=40, temperature=temperature,
                         top_p=top_p, generator=torch.Generator().manual_seed(seed))[0]  # fmt: skip
        assert row == alone
    if temperature:
        assert len({tuple(row) for row in batched}) > 1, "different seeds draw different answers"


# -- Monte-Carlo step labels (VisualPRM's rule) ----------------------------------------------------------------


def _mc_prompt(model, tokenizer):
    generator = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.randint(0, 256, (4,), generator=generator),
                     torch.full((model.tokens_per_tile(),), model.image_context_id)])  # fmt: skip
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, model.tile_size, model.tile_size, generator=generator)}


def test_monte_carlo_labels_follow_the_rule_with_its_early_stop():
    """With no continuation drawn a prefix's score is whether it already states the right answer: the reference's
    rule, hand-computed (a step is + when its score exceeds 0; after a zero every step is -)."""
    tokenizer = ByteTokenizer()
    model = _tiny_model(tokenizer)
    prompt = _mc_prompt(model, tokenizer)
    solutions = [["2 red", "1 blue", "Answer: red"], ["Answer: red", "so red"], ["Answer: blue"]]
    early = monte_carlo_labels(model, tokenizer, prompt, solutions, "red", samples=2, max_new_tokens=0)
    assert [row["scores"] for row in early] == [[0.0, 0.0, 0.0], [1.0, 0.0], [0.0]]
    assert [row["labels"] for row in early] == [["-", "-", "-"], ["+", "-"], ["-"]]
    late = monte_carlo_labels(model, tokenizer, prompt, solutions, "red", samples=2, max_new_tokens=0, early_stop=False)
    assert [row["labels"] for row in late] == [["-", "-", "+"], ["+", "-"], ["-"]]


def test_monte_carlo_labels_equal_lone_seeded_continuations_of_every_prefix():
    tokenizer = ByteTokenizer()
    model = _tiny_model(tokenizer)
    prompt = _mc_prompt(model, tokenizer)
    solutions, k, seed, new = [["2 red", "Answer: red"], ["x", "y", "z"]], 3, 7, 5
    prefixes = ["2 red", "2 red\n\nAnswer: red", "x", "x\n\ny", "x\n\ny\n\nz"]
    continued = []  # each prefix continued alone, seed by seed
    for b, prefix in enumerate(prefixes):
        ids = torch.cat([prompt["input_ids"], torch.tensor(tokenizer.encode(prefix))])[None]
        for j in range(k):
            row = generate(model, ids, None, prompt["pixel_values"], max_new_tokens=new, eos_id=tokenizer.eos_id,
                           temperature=1.0, generator=torch.Generator().manual_seed(seed + b * k + j))[0]  # fmt: skip
            text = tokenizer.decode([t for t in row if t != tokenizer.eos_id], skip_special_tokens=True)
            continued.append(final_answer(prefix + text))
    answer = continued[2 * k]  # what one continuation of "x" reaches: that prefix scores at least 1/k
    scores = [sum(a == answer for a in continued[b * k : (b + 1) * k]) / k for b in range(len(prefixes))]
    expected = []
    for row in (scores[:2], scores[2:]):  # the early stop, written out: after a zero, every score is zero
        dead, kept = False, []
        for score in row:
            kept.append(0.0 if dead else score)
            dead = dead or score == 0
        expected.append(kept)
    got = monte_carlo_labels(model, tokenizer, prompt, solutions, answer, samples=k, seed=seed, max_new_tokens=new)
    assert [row["scores"] for row in got] == expected
    assert [row["labels"] for row in got] == [["+" if s > 0 else "-" for s in row] for row in expected]
    assert got[1]["labels"][0] == "+"


# -- the multi-step shapes data ----------------------------------------------------------------------------------


def _true_steps(qa: dict, size: int) -> list[str]:
    """The solution written again from the scene's objects alone (not from the generator's facts)."""
    objects = qa["objects"]
    if qa["type"] == "compare":
        words = qa["question"].split()  # "Are there more {a} or {b} objects?"
        a, b = words[3], words[5]
        counts = [sum(o.colour == c for o in objects) for c in (a, b)]
        name = [f"{n} {c} object{'' if n == 1 else 's'}" for n, c in zip(counts, (a, b))]
        return [*name, f"Answer: {a if counts[0] > counts[1] else b}"]
    shape = qa["question"].removeprefix("Where is the ").removesuffix("?")
    (target,) = [o for o in objects if o.shape == shape]
    region = target.region(size)
    return [f"the {shape} is {target.colour}", f"the {target.colour} {shape} is at the {region}", f"Answer: {region}"]


def test_multi_step_solutions_and_their_labels_follow_the_scene():
    from lit_internvl.data.shapes.steps import corrupted, label_from_scene, reasoning
    from lit_internvl.data.shapes.world import ShapesWorld

    world = ShapesWorld(84, 0, "val")
    kinds, right_after_corruption = set(), 0
    for index in range(60):
        qa = reasoning(world, index)
        kinds.add(qa["type"])
        truth = _true_steps(qa, 84)
        assert qa["steps"] == truth and qa["answer"] == truth[-1].removeprefix("Answer: ")
        steps, labels = corrupted(world, index, qa)
        wrong = next(i for i, (step, true) in enumerate(zip(steps, truth)) if step != true)
        assert labels == ["+"] * wrong + ["-"] * (3 - wrong), (steps, truth, labels)
        right_after_corruption += steps[-1] == truth[-1]
        assert label_from_scene(qa, steps) == labels and label_from_scene(qa, truth) == ["+"] * 3
        assert label_from_scene(qa, [*truth, "Answer: again"]) == ["+"] * 3 + ["-"]
    assert kinds == {"compare", "locate"}
    assert 0 < right_after_corruption < 60, "some corrupted solutions still reach the right answer, not all"


def test_mistakes_are_wrong_solutions_built_from_the_scene():
    """Each of :func:`mistakes` is wrong somewhere and, from its first wrong step on, states what it began with; the
    locate ones take another object of the scene for the named shape (its colour, its region or both)."""
    from lit_internvl.data.shapes.steps import label_from_scene, mistakes, reasoning
    from lit_internvl.data.shapes.world import ShapesWorld

    world = ShapesWorld(84, 0, "train")
    confusions = 0
    for index in range(40):
        qa = reasoning(world, index)
        wrong = mistakes(world, index, qa)
        assert len({tuple(m) for m in wrong}) == len(wrong) and qa["steps"] not in wrong
        for steps in wrong:
            labels = label_from_scene(qa, steps)
            assert "-" in labels and labels == sorted(labels), (steps, labels)  # "+" then "-" ("+" < "-")
            if qa["type"] == "compare":
                n = [int(step.split()[0]) for step in steps[:2]]
                if n[0] != n[1]:  # a tie may be answered by either colour
                    a, b = qa["question"].split()[3], qa["question"].split()[5]
                    assert steps[2] == f"Answer: {a if n[0] > n[1] else b}" or n == qa["facts"]["counts"]
            else:
                colour, region = steps[0].split()[-1], steps[1].split(" at the ")[1]
                assert steps == _locate(qa["facts"]["shape"], colour, region)
                others = [(o.colour, o.region(84)) for o in qa["objects"] if o.shape != qa["facts"]["shape"]]
                confusions += (colour, region) in others
    assert confusions > 0


def _locate(shape: str, colour: str, region: str) -> list[str]:
    return [f"the {shape} is {colour}", f"the {colour} {shape} is at the {region}", f"Answer: {region}"]


# -- the stage and the commands ----------------------------------------------------------------------------------

TINY = {"trainer": {"max_epochs": 1, "max_steps": -1, "val_check_interval": 1.0, "enable_progress_bar": False, "logger": False,
                    "limit_val_batches": 1}}  # fmt: skip
TINY_SHAPES = {"train_size": 8, "val_size": 4, "batch_size": 4, "num_workers": 0}


def _recipe(tmp_path: Path, name: str, data: dict = TINY_SHAPES, **model) -> Path:
    import yaml

    from lit_internvl.recipes import compose

    recipe = compose(Path(__file__).parents[1] / "recipes" / name)
    root = tmp_path / Path(name).stem
    recipe["trainer"].update(TINY["trainer"], default_root_dir=str(root))
    recipe["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root / "checkpoints")
    recipe["data"]["init_args"].update(data)
    recipe["model"]["init_args"].update(generation={"max_new_tokens": 6}, **model)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
@pytest.mark.parametrize("context", ["plus", "labels"])
def test_the_critic_trains_on_plus_answers_by_default_and_validates_as_it_scores(context, monkeypatch):
    from lit_internvl.data.shapes.steps import ShapesStepsDataModule
    from lit_internvl.stages import CriticStage

    data = ShapesStepsDataModule(records="steps", train_size=4, val_size=4, batch_size=4)
    data.setup("fit")
    stage = CriticStage(InternViT("tiny"), PixelShuffleMLP(128, 128), Decoder("tiny-shapes"), context=context)
    stage.use_data(data)
    stage.configure_model()
    seen = []
    forward = stage.forward_batch
    monkeypatch.setattr(
        stage, "forward_batch", lambda batch, **kw: seen.append(batch.input_ids) or forward(batch, **kw)
    )
    whole = next(iter(data.train_dataloader()))
    batch = whole["conversation"]
    plus, minus = label_ids(data.tokenizer)
    answers = batch.labels != IGNORE_INDEX
    assert (batch.input_ids[answers] == minus).any()  # corrupted solutions: some "-" in the record
    stage.training_step(whole, 0)
    trained = seen[-1][answers]
    assert (trained == plus).all() if context == "plus" else (trained == batch.input_ids[answers]).all()
    seen.clear()
    stage.validation_step(whole, 0)
    assert (seen[0][answers] == plus).all()  # the accuracies: as scoring reads the answers
    assert len(seen) == (1 if context == "plus" else 2)  # val/loss: the training's own context
    with pytest.raises(ValueError, match="context"):
        CriticStage(InternViT("tiny"), PixelShuffleMLP(128, 128), Decoder("tiny-shapes"), context="scores")


def test_readme_commands_fit_the_policy_and_the_critic_then_predict_and_chat_best_of_n(tmp_path, capsys):
    """The README's critic section, with tiny overrides: fit the policy, the critic's start and the critic, predict
    with Best-of-N (every candidate and its step scores in predictions.jsonl), chat with --best-of, the benchmark."""
    from lit_internvl.cli import main

    policy = _recipe(tmp_path, "sft_steps.yaml")
    main(["fit", "--config", str(policy)])
    policy_ckpt = tmp_path / "sft_steps" / "checkpoints" / "last.ckpt"
    main(["critic_data", "--policy", str(policy_ckpt), "--policy-config", str(policy), "--output", str(tmp_path / "data"),
          "--train-questions", "3", "--val-questions", "2", "--samples", "2", "--scene-questions", "2"])  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert {len(r["steps"]) == len(r["labels"]) for r in records} == {True} and len(records) >= 6 + 2 * 3
    data = {"train": str(tmp_path / "data" / "train.jsonl"), "val": str(tmp_path / "data" / "val.jsonl"),
            "batch_size": 4, "num_workers": 0}  # fmt: skip
    # The critic's start: recipes/sft.yaml's chat model in the README (tests/test_readme.py runs that chain); here
    # the policy's checkpoint, as cheap and of the same architecture.
    base = _recipe(tmp_path, "critic_base.yaml", init_from=str(policy_ckpt))
    main(["fit", "--config", str(base)])
    base_ckpt = tmp_path / "critic_base" / "checkpoints" / "last.ckpt"
    critic = _recipe(tmp_path, "critic.yaml", data, init_from=str(base_ckpt))
    cli = main(["fit", "--config", str(critic)])
    metrics = cli.trainer.callback_metrics
    assert {"val/step_accuracy", "val/ranking_accuracy", "val/loss"} <= set(metrics)
    assert (
        0.5 <= cli.model.chance_levels["val/step_accuracy"] < 1
        and cli.model.chance_levels["val/ranking_accuracy"] == 0.5
    )
    critic_ckpt = tmp_path / "critic" / "checkpoints" / "last.ckpt"

    # init_from: the policy's weights alone (--ckpt_path would do as well: the command line's settings win).
    main(["predict", "--config", str(policy), "--model.init_args.init_from", str(policy_ckpt),
          "--model.init_args.generation.best_of", "3", "--model.init_args.generation.critic", str(critic_ckpt),
          "--model.init_args.generation.critic_config", str(critic), "--model.init_args.generation.temperature",
          "1.0"])  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "sft_steps" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert len(line["candidates"]) == 3 and line["answer"] == line["candidates"][line["best"]]["answer"]
        scores = [c["score"] for c in line["candidates"]]
        assert line["best"] == scores.index(max(scores))
        for candidate in line["candidates"]:
            assert len(candidate["step_scores"]) == len(split_steps(candidate["answer"]))
            assert all(0 <= s <= 1 for s in candidate["step_scores"])

    from lit_internvl.data.shapes.steps import reasoning
    from lit_internvl.data.shapes.world import ShapesWorld

    qa = reasoning(ShapesWorld(84, 0, "test"), 0)
    qa["image"].save(tmp_path / "scene.png")
    capsys.readouterr()
    answer = main(["chat", "--config", str(policy), "--checkpoint", str(policy_ckpt), "--best-of", "3", "--critic",
                   str(critic_ckpt), "--critic-config", str(critic), "--image", str(tmp_path / "scene.png"),
                   "--max-new-tokens", "6", qa["question"]])  # fmt: skip
    out = capsys.readouterr()
    assert out.out.strip() == answer.strip() and out.err.count("candidate ") >= 3

    import benchmarks.best_of_n as benchmark

    result = benchmark.main(["--policy", str(policy_ckpt), "--critic", str(critic_ckpt), "--policy-config",
                             str(policy), "--critic-config", str(critic), "--questions", "2", "--n", "2",
                             "--max-new-tokens", "6", "--step-samples", "4"])  # fmt: skip
    best_of = {"best_of/mean", "best_of/min", "best_of/last"}
    assert set(result["accuracy"]) == {"greedy", "majority", "oracle"} | best_of
    assert set(result["paired"]) == {"majority vs greedy"} | {f"{key} vs majority" for key in best_of}
    assert result["accuracy"]["oracle"] >= max(result["accuracy"][key] for key in best_of | {"majority"})
    assert "| greedy |" in capsys.readouterr().out


def test_the_benchmarks_paired_comparison_is_mcnemars_exact_test_on_the_discordant_questions():
    from benchmarks.best_of_n import paired

    # 1 question only the first gets right, 5 only the second, 4 both, 2 neither: under the null each of the 6
    # discordant ones is a fair coin, so P(≤ 1 of 6 one way) × 2 = 2 (C(6,0) + C(6,1)) / 2^6 = 14/64.
    a = [True] + [False] * 5 + [True] * 4 + [False] * 2
    b = [False] + [True] * 5 + [True] * 4 + [False] * 2
    assert paired(a, b) == {"wins": 1, "losses": 5, "p": pytest.approx(14 / 64)}
    assert paired(b, a)["p"] == pytest.approx(14 / 64) and paired(b, a)["wins"] == 5
    assert paired([True] * 3 + [False] * 3, [False] * 3 + [True] * 3)["p"] == 1.0  # balanced: capped at 1
    assert paired([False] * 10, [True] * 10)["p"] == pytest.approx(2 / 2**10)
    assert paired([True, False], [True, False]) == {"wins": 0, "losses": 0, "p": 1.0}  # nothing to tell apart


def test_prepare_writes_steps_records_as_shards_that_read_back_as_the_jsonl(tmp_path):
    from lit_internvl.cli import main
    from lit_internvl.data.shapes import ShapesWorld

    ShapesWorld(28).pair(0)["image"].save(tmp_path / "scene.png")
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "labels": ["+"]}) + "\n")  # the second is bad
    main(["prepare", "--input", str(path), "--output", str(tmp_path / "shards")])

    def first(train: str) -> dict:
        dm = records(train=train, tile_size=28, max_tiles=1, batch_size=1, system="S", budget=1)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["conversation"]

    jsonl, shards = first(str(path)), first(str(tmp_path / "shards"))
    assert torch.equal(jsonl.input_ids, shards.input_ids) and torch.equal(jsonl.labels, shards.labels)
    assert torch.equal(jsonl.pixel_values, shards.pixel_values)


# -- real checkpoints --------------------------------------------------------------------------------------------


def _plus_minus_tokenizer(folder: Path) -> None:
    """tests/test_hf.py's word-level tokenizer with ``+`` and ``-`` among its words (ids 138, 139), the special
    tokens at the same ids (``<IMG_CONTEXT>`` 145)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {**{f"w{i}": i for i in range(138)}, "+": 138, "-": 139}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(folder))


def test_scoring_a_tiny_transformers_folder_gives_transformers_step_probabilities(tmp_path):
    """The scoring path of ``--critic hf:/folder`` (recipes/internvl3_1b/critic.yaml's start) on a tiny
    transformers InternVL folder: each step's P(+) equals the two-way softmax of transformers' own logits."""
    from lit_internvl.data.records import Record
    from lit_internvl.data.shapes import ShapesWorld
    from lit_internvl.inference import load_hf_chat_model
    from lit_internvl.inference.critic import score_solutions
    from tests.test_hf import IMAGE_SIZE, _transformers_model

    reference = _transformers_model("qwen2", "300m", tie=False)
    reference.save_pretrained(str(tmp_path))
    _plus_minus_tokenizer(tmp_path)
    critic, builder = load_hf_chat_model(f"hf:{tmp_path}")
    ShapesWorld(IMAGE_SIZE).pair(0)["image"].save(tmp_path / "scene.png")
    turns = [{"from": "human", "value": "w1 w2"}]
    built = builder(Record("conversation", "q", {"conversations": turns}, [str(tmp_path / "scene.png")]))
    pixels = built["views"]["prompt"]["pixel_values"]
    solutions = [["w3 w4", "w5 w6", "w7"], ["w8"]]
    scores = score_solutions(critic.eval(), builder.tokenizer, builder.options, "w1 w2", solutions, pixels)
    plus, minus = label_ids(builder.tokenizer)
    assert (plus, minus) == (138, 139)
    batch = critic_batch(builder.tokenizer, builder.options, "w1 w2", solutions, pixels, critic.tokens_per_tile())
    for row, expected_steps in enumerate(scores):
        real = batch.attention_mask[row] == 1
        ids, labels = batch.input_ids[row][real], batch.labels[row][real]
        with torch.no_grad():
            logits = reference(input_ids=ids[None], pixel_values=pixels).logits[0]
        before = (labels != IGNORE_INDEX).nonzero().flatten() - 1  # the logits that predict each answer
        expected = torch.softmax(logits[before][:, [plus, minus]], dim=-1)[:, 0]
        assert len(expected_steps) == len(solutions[row])
        assert torch.allclose(torch.tensor(expected_steps), expected, atol=1e-5), (expected_steps, expected)
