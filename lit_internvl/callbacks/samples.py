"""Validation samples in TensorBoard: a grid of the first K images of each validation, each with what the model
made of it — the question asked, the generated answer and the reference (SFT, MPO, RL), the nearest class names or
captions (the dual-encoder stages 1 and 2), the predicted and true class (the linear probe), or the predicted mask over
the image (the segmentation probe)."""

from __future__ import annotations

import re
import textwrap

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont

from lit_internvl.batch import IGNORE_INDEX, Images
from lit_internvl.data.images import IMAGENET_MEAN, IMAGENET_STD
from lit_internvl.data.tokenizer import IMG_CONTEXT
from lit_internvl.distributed import unsharded
from lit_internvl.inference.generate import generate


def to_image(tile: torch.Tensor) -> Image.Image:
    """A normalised ``(3, H, W)`` tile (ImageNet mean/std, as the data path writes it) → an RGB image."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (tile.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")


def sample_grid(cells: list[tuple[Image.Image, list[str]]], columns: int = 4, size: int = 160) -> np.ndarray:
    """Images with lines of text under each, in rows of ``columns`` cells → ``(H, W, 3)`` uint8 (HWC)."""
    font = ImageFont.load_default()
    line_height, chars = 12, size // 6
    wrapped = [[piece for line in lines for piece in textwrap.wrap(line, chars) or [""]] for _, lines in cells]
    cell_height = size + 4 + line_height * max(len(lines) for lines in wrapped)
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * (size + 8), rows * (cell_height + 8)), "white")
    draw = ImageDraw.Draw(grid)
    for index, ((image, _), lines) in enumerate(zip(cells, wrapped)):
        x, y = (index % columns) * (size + 8) + 4, (index // columns) * (cell_height + 8) + 4
        grid.paste(image.resize((size, size), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + size + 4 + k * line_height), line, fill="black", font=font)
    return np.asarray(grid)


def _last_run(labels: torch.Tensor) -> tuple[int, int] | None:
    """``(start, end)`` of the last run of supervised positions of a ``(T,)`` label row (the last answer)."""
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    if not supervised:
        return None
    start = supervised[-1]
    while start - 1 in supervised:
        start -= 1
    return start, supervised[-1] + 1


class SampleLogger(L.Callback):
    """Logs ``val/samples`` (an image grid) and ``val/samples_text`` (a table of the same) to TensorBoard after
    the first batch of each validation (not the sanity check), for its first ``num_samples`` samples.

    - Vision-language stages (SFT, MPO, RL): each sample's prompt — the sample up to its last answer (the chosen
      one of a preference pair), or the whole prompt of a prompt batch — is answered greedily (the stage's
      ``generation.max_new_tokens`` unless ``max_new_tokens`` is set), under the reference (the last answer, or the batch's
      ``reference``). The image drawn is a sample's last tile: the whole-image thumbnail when it has several.
      Under FSDP2 every rank generates (the blocks gather their parameters together); rank 0 draws.
    - Dual-encoder stages (stages 1 and 2): the ``top_k`` class names nearest each image (the stage's zero-shot
      class embeddings) when the data names classes, else the nearest captions of the batch, with the true one;
      the embeddings are those the validation step computed (no second forward pass).

    Args:
        num_samples: samples drawn (at most the first validation batch's).
        top_k: nearest class names or captions listed per image.
        max_new_tokens: answer length (None: the stage's ``generation.max_new_tokens``).
        columns: images per row of the grid.
    """

    def __init__(self, num_samples: int = 8, top_k: int = 3, max_new_tokens: int | None = None, columns: int = 4):
        if num_samples < 1 or top_k < 1:
            raise ValueError(f"SampleLogger: num_samples ({num_samples}) and top_k ({top_k}) must be at least 1")
        self.num_samples, self.top_k, self.max_new_tokens, self.columns = num_samples, top_k, max_new_tokens, columns
        self.rows: list[dict] = []  # the last samples logged: image, name and lines of text

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            raise ValueError(
                "SampleLogger writes to TensorBoard: set trainer.logger to lightning.pytorch.loggers.TensorBoardLogger "
                "(the recipes do), or leave callbacks/sample_logger.yaml out"
            )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if batch_idx or dataloader_idx or trainer.sanity_checking or batch.empty:
            return
        batch = batch.first
        if isinstance(outputs, dict) and "image_embeddings" in outputs:
            self.rows = self.nearest(pl_module, batch, outputs)
        elif isinstance(outputs, dict) and "probe" in outputs:
            self.rows = self.probed(pl_module, batch, outputs["probe"])
        else:
            self.rows = self.answers(pl_module, batch)
        if trainer.is_global_zero and self.rows:
            self.log_rows(trainer)

    # -- dual encoders: nearest class names or captions ----------------------------------------------------------

    def nearest(self, pl_module, batch: dict, outputs: dict) -> list[dict]:
        data, k = pl_module.data, self.num_samples
        image_emb = list(outputs["image_embeddings"].values())[-1][:k]  # the last: InternVL-G's own, when several
        prefix = getattr(getattr(data, "caption_forms", None), "itc_prefix", "") or ""
        captions = [
            data.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).removeprefix(prefix).strip()
            for ids, mask in zip(batch.input_ids, batch.attention_mask)
        ]
        classes = getattr(pl_module, "class_embeddings", None)
        if classes is not None:
            names, candidates, truths = list(data.class_names), classes, [int(x) for x in batch.label[:k]]
            title = "nearest classes"
        else:
            names, candidates, truths = captions, outputs["text_embeddings"], list(range(len(image_emb)))
            title = "nearest captions"
        scores = image_emb.float() @ candidates.float().T
        top = scores.topk(min(self.top_k, scores.shape[1]), dim=-1)
        rows = []
        for row, (values, indices) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            truth = names[truths[row]] if truths[row] >= 0 else "(no label)"
            lines = [f"true: {truth}", f"{title}:"] + [f"{names[i]} ({v:.2f})" for i, v in zip(indices, values)]
            rows.append({"image": to_image(batch.pixel_values[row]), "name": batch.sample_names[row],
                         "lines": lines, "truth": truth, "nearest": [names[i] for i in indices]})  # fmt: skip
        return rows

    # -- probes: the predicted class, or the predicted mask over the image --------------------------------------

    def probed(self, pl_module, batch, probe: dict) -> list[dict]:
        names = list(getattr(pl_module.data, "class_names", None) or [])

        def name(label: int) -> str:
            return names[label] if 0 <= label < len(names) else str(label)

        rows = []
        for row in range(min(self.num_samples, batch.rows)):
            image = to_image(batch.pixel_values[row])
            if "predicted_mask" in probe:
                predicted, true = probe["predicted_mask"][row].cpu(), probe["true_mask"][row].cpu()
                image = mask_overlay(image, predicted)
                kept = true != 255
                accuracy = float((predicted[kept] == true[kept]).float().mean()) if kept.any() else float("nan")
                shown = sorted({name(int(c)) for c in predicted.unique()})
                lines = [f"predicted mask: {', '.join(shown)}", f"pixel accuracy: {accuracy:.2f}"]
            else:
                predicted, true = int(probe["predicted"][row]), int(probe["true"][row])
                lines = [f"predicted: {name(predicted)}", f"true: {name(true)}"]
            rows.append({"image": image, "name": batch.sample_names[row], "lines": lines})
        return rows

    # -- vision-language models: generated answers --------------------------------------------------------------

    def answers(self, pl_module, batch: dict) -> list[dict]:
        model, tokenizer = pl_module.model, pl_module.data.tokenizer
        rows = min(self.num_samples, batch.rows)
        context_id, documents = tokenizer.token_to_id(IMG_CONTEXT), batch.document_ids
        prompts, references, images = [], [], []
        for row in range(rows):
            # A packed row's first document; an unpacked row's real tokens (either padding side).
            keep = (documents[row] == 0) if documents is not None else batch.attention_mask[row].bool()
            ids, labels, positions = batch.input_ids[row][keep], batch.labels[row][keep], batch.positions[row][keep]
            answer = _last_run(labels)
            reference = (batch.reference or [None] * rows)[row]
            if answer is not None:  # a trained sample: its prompt is everything before its last answer
                if reference is None:
                    reference = tokenizer.decode(ids[answer[0] : answer[1]].tolist(), skip_special_tokens=True)
                ids, positions = ids[: answer[0]], positions[: answer[0]]
            # The prompt's tiles: the row's first ones whose budgets fill the prompt's <IMG_CONTEXT> slots (a packed
            # row's first document; a conversation whose last turn held an image leaves that image out).
            images_of_row = _leading_tiles(batch.images.select([row]) if batch.images is not None else None,
                                           int((ids == context_id).sum()))  # fmt: skip
            tiles = 0 if images_of_row is None else images_of_row.pixel_values.shape[0]
            prompts.append((ids, positions, images_of_row, tiles))
            references.append(reference)
            images.append(
                to_image(images_of_row.pixel_values[-1]) if images_of_row else Image.new("RGB", (32, 32), "lightgray")
            )
        width = max(len(ids) for ids, *_ in prompts)
        input_ids = torch.full((rows, width), tokenizer.pad_id, dtype=torch.long, device=pl_module.device)
        mask = torch.zeros_like(input_ids)
        positions = torch.zeros(rows, width, dtype=torch.float32, device=pl_module.device)
        for row, (ids, pos, _, _) in enumerate(prompts):  # left-padded, as generation reads prompts
            input_ids[row, width - len(ids) :], mask[row, width - len(ids) :] = ids, 1
            positions[row, width - len(ids) :] = pos
        own = [p for _, _, p, _ in prompts if p is not None]
        images_all = None
        if own:
            images_all = Images(
                torch.cat([p.pixel_values for p in own]), [t for *_, t in prompts], [b for p in own for b in p.budgets]
            )
        generation = getattr(pl_module, "generation", None)
        max_new = self.max_new_tokens or (generation.max_new_tokens if generation is not None else 32)
        with unsharded(model):
            generated = generate(
                model, input_ids, mask, images_all, max_new_tokens=max_new, eos_id=tokenizer.eos_id, positions=positions
            )
        out = []
        for row, tokens in enumerate(generated):
            answer = tokenizer.decode([t for t in tokens if t != tokenizer.eos_id], skip_special_tokens=True)
            question = prompt_question(tokenizer, prompts[row][0])
            lines = [f"question: {question}", f"answer: {answer}", f"reference: {references[row]}"]
            out.append({"image": images[row], "name": batch.sample_names[row], "lines": lines, "question": question,
                        "answer": answer, "reference": references[row], "tokens": tokens})  # fmt: skip
        return out

    # -- writing ------------------------------------------------------------------------------------------------

    def log_rows(self, trainer) -> None:
        grid = sample_grid([(row["image"], [str(row["name"]), *row["lines"]]) for row in self.rows], self.columns)
        table = "| sample | " + " | ".join(f"line {i + 1}" for i in range(len(self.rows[0]["lines"]))) + " |\n"
        table += "|---" * (1 + len(self.rows[0]["lines"])) + "|\n"
        for row in self.rows:
            table += f"| {row['name']} | " + " | ".join(line.replace("|", "/") for line in row["lines"]) + " |\n"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/samples", grid, trainer.global_step, dataformats="HWC")
                logger.experiment.add_text("val/samples_text", table, trainer.global_step)


def _leading_tiles(images: Images | None, slots: int) -> Images | None:
    """The first tiles of ``images`` (one row's) whose budgets add up to ``slots``; None for no slot."""
    if images is None or slots == 0:
        return None
    filled, count = 0, 0
    while filled < slots and count < len(images.budgets):
        filled, count = filled + images.budgets[count], count + 1
    return Images(images.pixel_values[:count], [count], images.budgets[:count])


# The last user turn of a ChatML prompt (InternVL's templates), and the image spans inside it.
_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|$)", re.S)
_IMAGE_SPAN = re.compile(r"<img>.*?</img>|<IMG_CONTEXT>|<image>", re.S)


def prompt_question(tokenizer, ids: torch.Tensor) -> str:
    """What a prompt's last user turn asks, its images left out (``<img>…</img>``); for a template without
    ChatML's markers, the prompt's text less its special tokens."""
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    turns = _USER_TURN.findall(text)
    if not turns:
        return " ".join(tokenizer.decode(ids.tolist(), skip_special_tokens=True).split())
    return " ".join(_IMAGE_SPAN.sub(" ", turns[-1]).split())


#: One colour per mask class (0, the background, left as the image is).
_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.float32)  # fmt: skip


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """``image`` with each pixel of class ``c > 0`` of ``mask`` ``(H, W)`` tinted with the class's colour."""
    pixels = np.asarray(image, dtype=np.float32)
    classes = mask.numpy()
    colours = _PALETTE[classes % len(_PALETTE)]
    tinted = np.where((classes > 0)[..., None], (1 - alpha) * pixels + alpha * colours, pixels)
    return Image.fromarray(tinted.clip(0, 255).astype(np.uint8), "RGB")
