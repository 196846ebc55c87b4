"""lit_internvl as an lmms-eval model: the harness people compare InternVL numbers with runs any checkpoint this
project can load, through the project's own prompt building (template, tiling, ``<image>`` placeholders as trained)
and :func:`~lit_internvl.inference.generate.generate`, the path ``chat`` and ``predict`` take.

    pip install 'lit_internvl[eval]'     # lmms-eval; the entry point registers the model "lit_internvl"
    lmms-eval --model lit_internvl --model_args checkpoint=runs/sft/checkpoints/last.ckpt,config=recipes/sft.yaml \\
        --tasks pope --batch_size 1
    lmms-eval --model lit_internvl --model_args checkpoint=hf:/path/to/InternVL3-1B --tasks mme

``checkpoint`` is a Lightning ``.ckpt`` (with ``config``, the recipe it was trained with, which says how to build it
and how its data was read) or ``hf:/folder`` (a Hugging Face InternVL folder; the template and tile size come from
it). ``max_new_tokens`` is the default answer length; a task's ``generation_kwargs`` (``max_new_tokens``,
``temperature``, ``top_p``, ``until``) win. ``generate_until`` is implemented; ``loglikelihood`` (multiple-choice
tasks scored by likelihood) and multi-round generation are not, and say so.

lmms-eval finds the model through the ``lmms_eval.models`` entry point that ``pyproject.toml`` declares
(:func:`manifest`); lmms-eval's interface (``lmms_eval.api.model.lmms``, ``Instance.args`` of a generation request:
``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``) is that of lmms-eval 0.7.
"""

from __future__ import annotations

import torch

try:
    from lmms_eval.api.model import lmms
except ImportError as error:  # the optional extra is missing: nothing of lmms-eval's to subclass
    raise ImportError("the lmms-eval bridge needs lmms-eval: pip install 'lit_internvl[eval]'") from error

MODEL_ID = "lit_internvl"


def manifest():
    """The ``lmms_eval.models`` entry point: this module's model under the name ``lit_internvl``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LitInternVL")


def load_model(checkpoint: str, config: str | None = None):
    """``(model, prompt builder)`` of ``checkpoint`` (``hf:/folder``, or a ``.ckpt`` built by the recipe ``config``)."""
    # Imported here, not above: lmms-eval imports this module to read the entry point (manifest) on every run.
    from lit_internvl.inference import load_hf_chat_model
    from lit_internvl.tools.chat import load_from_recipe

    if checkpoint.startswith("hf:"):
        return load_hf_chat_model(checkpoint)
    if config is None:
        raise ValueError(
            f"--model_args checkpoint={checkpoint} is a Lightning checkpoint: add config=RECIPE.yaml, the recipe it "
            "was trained with"
        )
    return load_from_recipe(config, checkpoint)


def cut_at(text: str, until: list[str] | str | None) -> str:
    """``text`` up to the first of the ``until`` strings (lmms-eval's stop sequences)."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text


class LitInternVL(lmms):
    """An lmms-eval "simple" model over a lit_internvl checkpoint (module docstring).

    Args:
        checkpoint: ``hf:/folder`` or a Lightning ``.ckpt``.
        config: the recipe a ``.ckpt`` was trained with.
        max_new_tokens: answer length when the task does not say.
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``).
        batch_size: accepted for lmms-eval's command line; requests are answered one at a time.
    """

    def __init__(
        self,
        checkpoint: str,
        config: str | None = None,
        max_new_tokens: int = 64,
        device: str = "cpu",
        batch_size: int | str = 1,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"--model_args: {sorted(unknown)} are not arguments of {MODEL_ID} ({type(self).__doc__})")
        model, self.builder = load_model(checkpoint, config)
        self.model = model.to(device).eval()
        self.max_new_tokens = int(max_new_tokens)
        self.device = torch.device(device)

    def generate_until(self, requests) -> list[str]:
        from lit_internvl.inference import answer

        out = []
        for request in requests:
            context, kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs = dict(kwargs or {})
            images = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            images = [image.convert("RGB") for image in images or [] if image is not None]
            with torch.no_grad():
                text = answer(
                    self.model, self.builder, context, images,
                    max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
                    temperature=float(kwargs.get("temperature", 0.0) or 0.0), top_p=float(kwargs.get("top_p", 1.0)),
                )  # fmt: skip
            out.append(cut_at(text, kwargs.get("until")))
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(
            f"{MODEL_ID} answers generation tasks (output_type: generate_until); likelihood-scored tasks are not "
            "implemented"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_ID} answers one round: multi-round generation is not implemented")
