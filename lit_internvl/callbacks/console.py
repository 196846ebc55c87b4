"""What a run prints as it starts and trains: Lightning's rich progress bar and model summary, showing only
figures that were measured. The command line gives them to every run that does not turn them off or name its own
(:class:`~lit_internvl.cli.RecipeCLI`)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar with whole numbers shown whole: the logger's version reads ``v_num: 0``, not
    ``0.000`` (the theme's three decimals are for the logged losses)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {name: str(value) if isinstance(value, int) else value for name, value in items.items()}


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without a FLOPs column when no FLOPs were counted.

    Lightning counts them by running the module on its ``example_input_array``; a stage has none (its steps read
    whole batches), so the column would read 0 on every row. The analytic FLOPs and MFU of each training batch are
    :class:`~lit_internvl.callbacks.throughput.TrainingThroughput`'s.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops,
                **summarize_kwargs,
            )  # fmt: skip
            return
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(
                name, style="dim" if name == " " else None, justify="right" if name == "Params" else "left"
            )
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        totals = Table.grid(expand=True)
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            totals.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(totals)
