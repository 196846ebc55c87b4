"""Every shell command in README.md is run here, with tiny overrides, so the README cannot drift from the code.

What counts as a command (``readme_commands``):
- the lines of fenced blocks tagged ``bash``, ``sh`` or ``console`` (in ``console`` blocks only lines starting
  with ``$ ``, the rest being output); other blocks (``yaml``, ``python``, ``json``, untagged output) are not;
- a line ending in ``\\`` continues on the next one; blank lines and lines that are only a comment are skipped;
  a trailing `` # comment`` is dropped (shell rules: a ``#`` inside quotes stays);
- ``...`` in a command stands for the arguments of the command before it in the same block (``fit ... --ckpt_path
  last``);
- a block whose first line is ``#!`` is a script: it is one command, the whole text.

Each command must match exactly one runner in ``RUNNERS``; ``test_every_command_has_one_runner`` prints the list
with the runner of each and fails on a command that has none. A runner either **runs** the command (in this
process where it is a ``python -m lit_internvl`` or ``benchmarks/`` command, else in a subprocess) in a sandbox
folder holding links to ``recipes/``, ``callbacks/`` and ``benchmarks/``, with the README's placeholders replaced
(``PLACEHOLDERS``: ``/path/to/InternVL3-1B`` is a tiny transformers InternVL folder, ``train.jsonl`` generated
shapes records, …) and tiny overrides appended (``tiny_overrides``: 2 steps, a few samples), or only **checks**
it, said so in its name: installing into a fresh venv (files and extras checked, ``uv venv`` run), ``make test`` and
``make pipeline`` (``make -n``, each line it would run must itself match a runner; the recipes they name are run
by the fit runner), real-size recipes on GPUs (parsed and composed with ``--print_config``, the tiny folder as the
checkpoint), the SLURM script (``bash -n``, and its ``srun`` command checked as a real-size fit), ``tensorboard``.
A run that produces a ``runs/<name>`` checkpoint another command reads is made on demand by the recipe's own fit
command (``Sandbox.ensure``), so each command also runs alone (``-k``).
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PYTHON = sys.executable


# -- reading the README --------------------------------------------------------------------------------------------


def readme_commands(text: str) -> list[str]:
    """The shell commands of ``text``'s bash/sh/console blocks, by the rules of the module docstring."""
    commands = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if language not in ("bash", "sh", "console"):
            continue
        if body.startswith("#!"):
            commands.append(body)
            continue
        lines, previous = body.splitlines(), None
        while lines:
            line = lines.pop(0)
            while line.endswith("\\") and lines:
                line = line[:-1] + " " + lines.pop(0).strip()
            if language == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            command = _strip_comment(line).strip()
            if not command:
                continue
            head, dots, tail = command.partition(" ... ")
            if dots and previous is not None and previous.startswith(head):
                command = f"{previous} {tail}"
            commands.append(" ".join(command.split()))
            previous = commands[-1]
    return commands


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (``#`` at a word start, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


# -- the sandbox: placeholders, tiny overrides, runs made on demand ---------------------------------------------

# Appended to every fit/validate/test/predict of an embedded-default recipe: 2 steps of 4 samples.
TINY_TRAINER = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                "--trainer.limit_predict_batches", "1", "--trainer.val_check_interval", "1.0", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false"]  # fmt: skip
TINY_SHAPES = ["--data.init_args.train_size", "8", "--data.init_args.val_size", "4", "--data.init_args.batch_size",
               "4", "--data.init_args.num_workers", "0"]  # fmt: skip
TINY_RECORDS = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
# Appended to `python -m lit_internvl critic_data`: 2 questions of each split, 1 sample, 2 scene questions.
SMALL_CRITIC_DATA = ["--train-questions", "2", "--val-questions", "2", "--samples", "1", "--scene-questions", "2"]
# Recipes whose tiny overrides are not their datamodule's (tiny_overrides): RL samples 8 answers a prompt.
TINY_EXCEPTIONS = {"rl": [*TINY_SHAPES[:4], "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0"]}


def tiny_overrides(recipe: str | Path) -> list[str]:
    """The tiny data overrides of an embedded-default recipe (``recipes/NAME.yaml``): by its datamodule, generated
    shapes (a few samples) or records (the README's files, small batches), unless TINY_EXCEPTIONS names it."""
    from lit_internvl.recipes import compose

    name = Path(recipe).stem
    if name in TINY_EXCEPTIONS:
        return TINY_EXCEPTIONS[name]
    data = compose(REPO / "recipes" / f"{name}.yaml")["data"]["class_path"]
    return TINY_RECORDS if data.endswith("RecordsDataModule") else TINY_SHAPES


class Sandbox:
    """A folder standing for the repository root as a user sees it after cloning, with generated inputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in ("recipes", "callbacks", "benchmarks", "lit_internvl"):
            (root / name).symlink_to(REPO / name)
        self.env: dict[str, str] = {}
        self.ran: list[str] = []
        self._hf: Path | None = None
        self._records = False

    # inputs, made when a command first needs them
    def hf_folder(self) -> Path:
        """A tiny transformers InternVL folder (random weights, a word-level tokenizer with InternVL's tokens)."""
        if self._hf is None:
            from tests.test_hf import _tokenizer_folder, _transformers_model

            self._hf = self.root / "hf" / "InternVL3-tiny"
            _transformers_model("qwen2", "300m", tie=False).save_pretrained(str(self._hf))
            _tokenizer_folder(self._hf)
        return self._hf

    def records(self) -> None:
        """Shapes records and images for the 'your own data' commands, under the names the README uses."""
        if self._records:
            return
        import json

        from lit_internvl.data.shapes.world import ShapesWorld, class_names, write_records

        for split, name in (("train", "train"), ("val", "val"), ("test", "test")):
            path = write_records(self.root / "records" / name, "pair", 8, split=split)
            (self.root / f"{name}.jsonl").write_text(path.read_text().replace('"images/', f'"records/{name}/images/'))
        (self.root / "classes.txt").write_text("\n".join(class_names()) + "\n")
        conversations = write_records(self.root / "records" / "chat", "conversation", 8)
        (self.root / "data").mkdir()  # the records recipes' default train file: the same pairs as train.jsonl
        (self.root / "data" / "train.jsonl").write_text((self.root / "records/train/pair.jsonl").read_text())
        (self.root / "data" / "images").symlink_to(self.root / "records/train/images")
        image = next(iter(sorted((conversations.parent / "images").iterdir()))).relative_to(self.root)
        steps = {
            "image": str(image),
            "question": "How many?",
            "steps": ["2 red objects", "Answer: 2"],
            "labels": ["+", "-"],
        }
        (self.root / "steps.jsonl").write_text(json.dumps(steps) + "\n")
        meta = {"shapes": {"root": "records/chat", "annotation": str(conversations.relative_to(self.root))}}
        (self.root / "meta.json").write_text(json.dumps(meta))
        ShapesWorld(84, 0, "val").pair(0)["image"].save(self.root / "scene.png")
        ShapesWorld(112, 0, "val").pair(1)["image"].convert("RGB").save(self.root / "photo.jpg")
        self._records = True

    def substitute(self, argv: list[str]) -> list[str]:
        """The README's placeholders → this sandbox's files."""
        out = []
        for arg in argv:
            for placeholder, value in self.placeholders().items():
                arg = arg.replace(placeholder, value)
            out.append(arg)
        return out

    def placeholders(self) -> dict[str, str]:
        return {
            "/path/to/InternVL3-1B": str(self.hf_folder()),
            "s3://bucket/shards": str(self.root / "object-storage-stand-in"),  # tests/test_object_storage.py: s3
        }

    # runs
    def ensure(self, name: str) -> None:
        """``runs/<name>/checkpoints/last.ckpt``, made by the recipe's own fit command when missing."""
        if name == "critic_data":
            if not (self.root / "runs/critic_data/train.jsonl").exists():
                self.ensure("sft_steps")
                self.cli(["critic_data", "--policy", "runs/sft_steps/checkpoints/last.ckpt", *SMALL_CRITIC_DATA])
            return
        if name in ("sft_from_nmp",) or (self.root / "runs" / name / "checkpoints" / "last.ckpt").exists():
            return
        own_data = ["--data.init_args.train", "train.jsonl", "--data.init_args.val", "val.jsonl"]  # as the README's
        self.cli(["fit", "--config", f"recipes/{name}.yaml", *(own_data if name.endswith("_records") else [])])

    def cli(self, argv: list[str]):
        """``python -m lit_internvl ARGV`` in this process, tiny overrides appended to a recipe's Trainer run."""
        from lit_internvl.cli import main

        argv = self.substitute(argv)
        if argv[0] in ("fit", "validate", "test", "predict"):
            recipe = argv[argv.index("--config") + 1]
            self.prerequisites(argv)
            argv = [*argv, *TINY_TRAINER, *tiny_overrides(recipe)]
        self.ran.append(" ".join(argv))
        return main(argv)

    def prerequisites(self, argv: list[str]) -> None:
        """The runs and files a command reads: the recipe's ``init_from`` and every ``runs/<name>/`` argument."""
        from lit_internvl.recipes import compose

        recipe = argv[argv.index("--config") + 1] if "--config" in argv else None
        names = set()
        if recipe and not any(a.startswith("--model.init_args.init_from") for a in argv):
            config = compose(self.root / recipe)
            init_from = config["model"]["init_args"].get("init_from")
            names |= set(re.findall(r"runs/([^/]+)/", str(init_from)))
            data = config["data"]["init_args"]
            names |= set(re.findall(r"runs/([^/]+)/", str(data.get("train"))))
        for arg in argv:
            names |= set(re.findall(r"^runs/([^/]+)/", arg))
        if any(a.endswith((".jsonl", "classes.txt")) for a in argv) or (recipe and "records" in recipe):
            self.records()
        for name in sorted(names):
            self.ensure(name)

    def script(self, argv: list[str]) -> None:
        """``python benchmarks/X.py ARGV`` in this process."""
        self.ran.append("python " + " ".join(argv))
        old = sys.argv
        sys.argv = argv
        try:
            runpy.run_path(str(self.root / argv[0]), run_name="__main__")
        finally:
            sys.argv = old

    def shell(self, command: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        env = {**(os.environ if env is None else env), **self.env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.ran.append(command)
        result = subprocess.run(
            command, shell=True, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout
        )  # fmt: skip
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result


# -- runners -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    pattern: str  # a regular expression the whole command matches
    how: str  # "runs" or "checks", and what exactly
    run: Callable[[Sandbox, str], None]


def _argv(command: str) -> list[str]:
    return shlex.split(command)


def run_lit_internvl(sandbox: Sandbox, command: str) -> None:
    argv = _argv(command)
    argv = argv[argv.index("lit_internvl") + 1 :]
    if argv[0] == "chat":
        argv.insert(1, "--max-new-tokens=4")
    if argv[0] in ("chat", "prepare") or "--image" in argv:
        sandbox.records()
    if argv[0] == "prepare":
        argv = [a if a != "8" else "1" for a in argv]  # --num-workers 8 → 1 on two cores
    if argv[0] == "critic_data":
        argv += SMALL_CRITIC_DATA
    if argv[0] in ("report", "evaluate", "export", "chat", "prepare", "critic_data"):
        sandbox.prerequisites(argv)
    if argv[0] == "evaluate" and not (sandbox.root / argv[argv.index("--predictions") + 1]).exists():
        sandbox.cli(["predict", "--config", "recipes/sft.yaml", "--ckpt_path", "runs/sft/checkpoints/last.ckpt"])
    if argv[0] == "fit" and ("--print_config" in argv or "--model.help" in argv):
        with pytest.raises(SystemExit) as exit_info:
            sandbox.cli(argv)
        assert exit_info.value.code in (0, None)
        return
    sandbox.cli(argv)


def run_probe(sandbox: Sandbox, command: str) -> None:
    """A probe recipe on a few pictures for two steps, a random encoder (the stage-1 run is the fit runner's)."""
    from lit_internvl.cli import main

    argv = _argv(command)
    argv = [*argv[argv.index("lit_internvl") + 1 :], "--output", str(sandbox.root / "runs/probe"),
            "--model.init_args.init_from", "null", *TINY_TRAINER, *TINY_SHAPES]  # fmt: skip
    sandbox.ran.append(" ".join(argv))
    rows = main(argv)
    assert rows and all(rows.values())


def check_lmms_eval(sandbox: Sandbox, command: str) -> None:
    """lmms-eval itself is the eval extra's (tests/test_lmms_bridge.py runs it where installed): the entry point the
    command relies on is declared, and every ``--model_args`` key is an argument of the bridge's model."""
    import ast

    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[project.entry-points."lmms_eval.models"]\nlit_internvl = "lit_internvl.tools.lmms:manifest"' in pyproject
    argv = _argv(command)
    keys = {pair.split("=", 1)[0] for pair in argv[argv.index("--model_args") + 1].split(",")}
    tree = ast.parse((REPO / "lit_internvl/tools/lmms.py").read_text())
    model = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "LitInternVL")
    init = next(n for n in model.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert keys <= {a.arg for a in init.args.args}, keys
    sandbox.ran.append(command + "  (checked)")


def check_real_size_fit(sandbox: Sandbox, command: str) -> None:
    """A real-size recipe is for GPUs: parsed, composed with its strategy and printed, the tiny folder as the
    checkpoint (tests/test_mpo.py builds each on the meta device)."""
    from lit_internvl.cli import main

    argv = _argv(command)
    argv = sandbox.substitute(argv[argv.index("lit_internvl") + 1 :])
    for name in ("INTERNVL_CHECKPOINT", "INTERNVIT_CHECKPOINT", "QWEN_CHECKPOINT"):  # the recipes' ${oc.env:…}
        os.environ[name] = sandbox.env.get(name, str(sandbox.hf_folder()))
    sandbox.ran.append(" ".join(argv) + " --print_config")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)


def check_plan(sandbox: Sandbox, command: str) -> None:
    """A plan of a real-size recipe takes minutes of fake steps: the recipe and presets it names are read and the step
    they describe printed (``--show-setup``); ``tests/test_planner.py`` runs the planner itself."""
    run_lit_internvl(sandbox, command + " --show-setup")


def run_export_env(sandbox: Sandbox, command: str) -> None:
    name, _, value = command.removeprefix("export ").partition("=")
    sandbox.env[name] = sandbox.substitute([value])[0]
    assert Path(sandbox.env[name]).is_dir()


def run_benchmark_script(sandbox: Sandbox, command: str) -> None:
    argv = sandbox.substitute(_argv(command)[1:])
    for arg in argv:
        for name in re.findall(r"^runs/([^/]+)/", arg):
            sandbox.ensure(name)
    sandbox.script([*argv, "--questions", "2", "--n", "2", "--step-samples", "4", "--max-new-tokens", "8"])


def run_flash_benchmark(sandbox: Sandbox, command: str) -> None:
    """benchmarks/flash.py on the tiny Flash chain (made on demand), a few questions."""
    for name in ("sft_detail", "vico", "vir"):
        sandbox.ensure(name)
    sandbox.script([*_argv(command)[1:], "--questions", "4", "--batch", "2", "--repeats", "1"])


def run_make_fit(sandbox: Sandbox, command: str) -> None:
    tiny = " ".join([*TINY_TRAINER, *tiny_overrides("stage1")])
    sandbox.shell(f"make -f {REPO}/Makefile fit STAMP= BIN={Path(PYTHON).parent} FIT_ARGS='{tiny}'")
    assert (sandbox.root / "runs/stage1/checkpoints/last.ckpt").exists()


def check_make_dry_run(sandbox: Sandbox, command: str) -> None:
    """``make -n TARGET``: every line it would run is itself a README command with a runner (``$(BIN)/`` dropped)."""
    target = command.split()[1]
    printed = sandbox.shell(
        f"make -n --no-print-directory -f {REPO}/Makefile {target} STAMP= BIN=.venv/bin"
    ).stdout.replace("\\\n", " ")
    lines = [line.replace(".venv/bin/", "") for line in printed.splitlines() if line.strip()]
    assert lines, f"make -n {target} printed nothing"
    for line in lines:
        line = " ".join(line.split())
        assert runners_for(line), f"make {target} runs {line!r}, which no README runner covers"


def run_ruff(sandbox: Sandbox, command: str) -> None:
    for part in command.split("&&"):
        subprocess.run([str(Path(PYTHON).parent / "ruff"), *part.split()[1:]], cwd=REPO, check=True)


def check_pytest(sandbox: Sandbox, command: str) -> None:
    """Not re-run from inside the suite: pytest's configuration selects the default suite this test is part of."""
    import tomllib

    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "not slow" in options["addopts"] and "slow" in " ".join(options["markers"])


def check_install(sandbox: Sandbox, command: str) -> None:
    """The install lines: files and extras they name exist; ``uv venv`` is run (the full install is ``make
    install``'s, not repeated here: it takes a minute and 1.7 GB)."""
    import tomllib

    argv = _argv(command)
    if "venv" in argv:
        uv = [PYTHON, "-m", "uv"] if subprocess.run([PYTHON, "-m", "uv", "--version"]).returncode == 0 else None
        uv = uv or ["python3", "-m", "uv"]
        subprocess.run([*uv, "venv", str(sandbox.root / ".venv"), "--python", PYTHON], check=True, capture_output=True)
        assert (sandbox.root / ".venv/bin/activate").exists()
    elif argv[:2] == ["source", ".venv/bin/activate"]:
        assert (sandbox.root / ".venv/bin/activate").exists(), "the venv the line before creates"
    elif "-e" in argv:
        extra = argv[argv.index("-e") + 1]
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert re.fullmatch(r"\.\[(\w+)\]", extra) and extra[2:-1] in extras
        assert (REPO / argv[argv.index("-c") + 1]).exists()
    else:
        assert argv[-1] == "uv"


def run_torchrun(sandbox: Sandbox, command: str) -> None:
    """On CPU gloo: two processes, tiny overrides, in the environment a user's shell has: without what earlier
    in-process runs of this suite left (``PL_GLOBAL_SEED``, which Lightning re-seeds each rank from, and any
    rank variables), on a free port rather than torchrun's default 29500 (``PET_MASTER_PORT``, torchrun's
    environment form of ``--master_port``)."""
    import socket

    argv = _argv(command)
    assert argv[argv.index("--nproc_per_node") + 1] == "2" and argv[argv.index("--trainer.devices") + 1] == "2"
    recipe = Path(argv[argv.index("--config") + 1]).stem
    tiny = " ".join([*TINY_TRAINER, *tiny_overrides(recipe)])
    left = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
            "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in left}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["PET_MASTER_PORT"] = str(s.getsockname()[1])
    torchrun = f"{Path(PYTHON).parent}/torchrun {' '.join(shlex.quote(a) for a in argv[1:])} {tiny}"
    sandbox.shell(torchrun, 600, env=env)
    assert list((sandbox.root / "runs" / recipe).rglob("metrics.json")), "rank 0 wrote the end-of-fit report"


def check_slurm_script(sandbox: Sandbox, script: str) -> None:
    """``bash -n`` on the script; its srun command checked as a real-size fit (srun itself is not here)."""
    path = sandbox.root / "train.sbatch"
    path.write_text(script)
    sandbox.shell(f"bash -n {path}")
    assert "#SBATCH --nodes" in script and "srun " in script
    for line in script.replace("\\\n", " ").splitlines():
        if line.startswith("export "):
            run_export_env(sandbox, line)
        if line.startswith("srun "):
            command = " ".join(line.split()[1:]).replace("$SLURM_NNODES", "2")
            check_real_size_fit(sandbox, command)


def check_tensorboard(sandbox: Sandbox, command: str) -> None:
    """Not started (it serves forever): the logs it reads exist after ``make fit``."""
    sandbox.ensure("stage1")
    assert list((sandbox.root / "runs/stage1").rglob("events.out.tfevents.*"))
    assert (Path(PYTHON).parent / "tensorboard").exists()


REAL_SIZE = r"recipes/internvl\d_\w+/"
RUNNERS = [
    Runner(r"make fit", "runs make fit with FIT_ARGS", run_make_fit),
    Runner(r"make (test|pipeline)", "checks make -n: each line covered", check_make_dry_run),
    Runner(r"ruff check \. && ruff format --check \.|ruff (check|format --check) \.", "runs ruff", run_ruff),
    Runner(r"python -m pytest -q", "checks the default suite's selection", check_pytest),
    Runner(r"python3\.11 -m (pip install uv|uv venv .*|uv pip install .*)|source .venv/bin/activate", "checks the install", check_install),
    Runner(rf"python -m lit_internvl fit (?!.*{REAL_SIZE}).*", "runs in process, tiny", run_lit_internvl),
    Runner(rf"python -m lit_internvl fit .*{REAL_SIZE}.*", "checks with --print_config (GPU sizes)", check_real_size_fit),
    Runner(r"python -m lit_internvl (validate|test|predict|chat|export|prepare|report|evaluate|critic_data) .*", "runs in process", run_lit_internvl),
    Runner(r"python -m lit_internvl plan .*", "checks the recipe it reads (--show-setup)", check_plan),
    Runner(r"export INTERNVL_CHECKPOINT=\S+", "runs (the tiny folder)", run_export_env),
    Runner(r"python benchmarks/best_of_n\.py .*", "runs in process, tiny", run_benchmark_script),
    Runner(r"python benchmarks/flash\.py( .*)?", "runs in process, tiny", run_flash_benchmark),
    Runner(r"torchrun --nproc_per_node 2 -m lit_internvl fit (?!.*internvl3).*", "runs 2 CPU processes, tiny", run_torchrun),
    Runner(r"#!/bin/bash\n.*#SBATCH.*", "checks bash -n; srun's command as a real-size fit", check_slurm_script),
    Runner(r"\.venv/bin/tensorboard --logdir runs", "checks its logs exist", check_tensorboard),
    Runner(r"python -m lit_internvl probe .*", "runs in process, tiny, a random encoder", run_probe),
    Runner(r"lmms-eval --model lit_internvl .*", "checks the entry point and the model's arguments", check_lmms_eval),
]  # fmt: skip


def runners_for(command: str) -> list[Runner]:
    return [r for r in RUNNERS if re.fullmatch(r.pattern, command, flags=re.S)]


COMMANDS = readme_commands(README.read_text())


def test_the_parser_follows_its_rules():
    text = (
        "```bash\npython -m x fit --a 1 \\\n    --b 2   # a comment\n# only a comment\n\npython -m x fit ... --c '#3'\n```\n"
        "```console\n$ make fit\noutput line\n```\n```yaml\nnot: a command\n```\n```sh\n#!/bin/bash\n#SBATCH -N 2\nsrun x\n```\n"
    )  # fmt: skip
    assert readme_commands(text) == [
        "python -m x fit --a 1 --b 2",
        "python -m x fit --a 1 --b 2 --c '#3'",
        "make fit",
        "#!/bin/bash\n#SBATCH -N 2\nsrun x\n",
    ]


def test_every_command_has_one_runner():
    print(f"\n{len(COMMANDS)} commands in README.md:")
    missing, ambiguous = [], []
    for command in COMMANDS:
        found = runners_for(command)
        print(f"  [{found[0].how if len(found) == 1 else 'NO RUNNER' if not found else 'AMBIGUOUS'}] {command}")
        (missing if not found else ambiguous if len(found) > 1 else []).append(command)
    assert not missing, f"README commands no runner runs: {missing}"
    assert not ambiguous, f"README commands with more than one runner: {ambiguous}"
    assert any("make fit" == c for c in COMMANDS) and len(COMMANDS) > 20


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    old = Path.cwd()
    root = tmp_path_factory.mktemp("readme")
    box = Sandbox(root)
    os.chdir(root)
    try:
        yield box
    finally:
        os.chdir(old)
        for name in ("INTERNVL_CHECKPOINT", "INTERNVIT_CHECKPOINT", "QWEN_CHECKPOINT"):
            os.environ.pop(name, None)


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_readme_command(command, sandbox):
    (runner,) = runners_for(command)
    print(f"\n{runner.how}: {command}")
    runner.run(sandbox, command)
