"""A study's YAML file -> the grid of runs it asks for.

The file (see studies/glue.yaml for a commented one) has these keys; only ``tasks``, ``optimizers``
and ``seeds`` are required::

    recipe: recipes/glue.py          # the recipe every run launches
    output_dir: runs/study-glue      # <output_dir>/runs/<run name>/ per run, report.md and plots/ on top
    launcher: [--num_processes, "1", --cpu, ...]   # accelerate launch arguments (default: one CPU process)
    seeds: [1, 2, 3]
    args: {data_dir: ${GLUE_DIR}, num_train_epochs: 3}   # recipe flags shared by every run
    tasks: {mrpc: {}, sst2: {args: {max_train_samples: 5000}, metric: accuracy}}
    optimizers: [sgd, adamw, adaptopt]          # or {name: {recipe flags for this optimizer}}
    lr_sweep: {adamw: [2.0e-5, 1.0e-4]}         # extra learning rates, at every seed and task
    ablation: {optimizer: adaptopt, variants: {no_clipping: {max_grad_norm: 0}}}
    compare: {candidate: adaptopt, baseline: adamw}   # the verdict: candidate at its default LR
                                                      # against baseline at its best swept LR
    #          peers: [prodigy]                         optional: more optimizers judged like the candidate
    #          margin: 0.005                            optional: a shortfall this small still counts as a match
    #          same_lr: false                           optional: no "both at the same LR" table (when the
    #                                                   candidate's lr means something else, e.g. a start)
    reuse: [studies/results/glue]    # other studies' folders whose finished runs of the same arguments count

Recipe flags are written as YAML: ``key: value`` becomes ``--key value``, ``key: true`` becomes
``--key``, ``false``/``null`` drops the flag. Later layers win: shared ``args`` < task ``args`` <
optimizer flags < ablation variant. ``${VAR}`` in a string is the environment variable: it must be set,
and it is expanded only when a run is launched, so a run's recorded arguments say ``${GLUE_DIR}`` and
stay the same run on a machine that keeps the data elsewhere.

Every run gets an explicit ``--learning_rate``: the optimizer's own from the YAML, else the registry
default (the papers' values, ``adaptopt.registry.OPTIMIZERS``). That makes a run's name and
arguments canonical, so the default-LR run and the same LR in the sweep are one run, not two.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..registry import OPTIMIZERS, default_hyperparameters

# One CPU process, fp32, no compilation: how the project's tests and docs launch a recipe.
DEFAULT_LAUNCHER = ("--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no")
FULL = "full"  # the ablation name of a run with all of the optimizer's parts on
# Flags the study sets per run; a YAML that sets them would silently fight the grid.
SET_BY_STUDY = ("task_name", "optimizer", "seed", "learning_rate", "output_dir")
TOP_KEYS = ("description", "recipe", "output_dir", "launcher", "seeds", "args", "tasks", "optimizers",
            "lr_sweep", "ablation", "compare", "reuse")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")  # names that become folder names
REPO = Path(__file__).resolve().parents[2]


class StudyConfigError(ValueError):
    """A study file that cannot be run as written; the message names the key and what to change."""


@dataclass(frozen=True)
class RunSpec:
    """One recipe run of the grid. ``flags`` are its recipe flags besides task/optimizer/seed/LR/output."""

    task: str
    optimizer: str
    learning_rate: float
    seed: int
    variant: str = FULL
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        variant = "" if self.variant == FULL else f"-{self.variant}"
        return f"{self.task}-{self.optimizer}{variant}-lr{self.learning_rate!r}-seed{self.seed}"

    def recipe_args(self) -> list[str]:
        """The recipe's arguments as the study file writes them (``${VAR}`` not expanded): what identifies the
        run. Without --output_dir (the runner adds it: it depends on where the study is)."""
        return ["--task_name", self.task, "--optimizer", self.optimizer, "--seed", str(self.seed),
                "--learning_rate", repr(self.learning_rate), *self.flags]

    def launch_args(self) -> list[str]:
        """``recipe_args`` with the environment variables expanded: what the recipe is started with."""
        return [os.path.expandvars(a) for a in self.recipe_args()]


@dataclass
class TaskSpec:
    args: dict = field(default_factory=dict)
    metric: str | None = None  # the metric tables rank by; None: the recipe's first (GLUE: the official one)


@dataclass
class Study:
    config_path: Path
    text: str  # the YAML as written, for the report
    recipe: Path
    output_dir: Path
    launcher: list[str]
    seeds: list[int]
    args: dict
    tasks: dict[str, TaskSpec]
    optimizers: dict[str, dict]  # name -> its recipe flags
    lr_sweep: dict[str, list[float]]
    ablation_optimizer: str | None
    ablation: dict[str, dict]  # variant name -> recipe flags
    candidate: str | None
    baseline: str | None
    description: str = ""
    peers: list[str] = field(default_factory=list)  # judged against the baseline like the candidate
    reuse: list[Path] = field(default_factory=list)  # other study folders whose finished runs count here
    margin: float = 0.0  # a candidate this close below the baseline's best still matches it
    same_lr: bool = True  # compare candidate and baseline at each LR both ran at (their lr means the same thing)

    def default_lr(self, optimizer: str) -> float:
        """The optimizer's LR in the main grid: the YAML's, else the registry's (the papers' default)."""
        lr = self.optimizers.get(optimizer, {}).get("learning_rate")
        return float(lr) if lr is not None else float(default_hyperparameters(optimizer)["lr"])

    def primary_metric(self, task: str) -> str | None:
        if self.tasks[task].metric:
            return self.tasks[task].metric
        if self.recipe.name == "glue.py":
            from ..data.glue import GLUE_TASKS

            return GLUE_TASKS[task].metrics[0]
        return None

    def runs(self) -> list[RunSpec]:
        """The whole grid, without duplicates, seed-major: a study stopped half way has whole seeds."""
        specs: dict[str, RunSpec] = {}
        for seed in self.seeds:
            for task in self.tasks:
                for opt in self.optimizers:
                    self._add(specs, task, opt, self.default_lr(opt), seed)
                for opt, lrs in self.lr_sweep.items():
                    for lr in lrs:
                        self._add(specs, task, opt, lr, seed)
                if self.ablation:  # the reference (all parts on) is part of the ablation even if not in the grid
                    self._add(specs, task, self.ablation_optimizer, self.default_lr(self.ablation_optimizer), seed)
                for variant, flags in self.ablation.items():
                    self._add(specs, task, self.ablation_optimizer, self.default_lr(self.ablation_optimizer), seed,
                              variant, flags)
        return list(specs.values())

    def _add(self, specs, task, opt, lr, seed, variant=FULL, variant_flags=None):
        merged = {**self.args, **self.tasks[task].args,
                  **{k: v for k, v in self.optimizers.get(opt, {}).items() if k != "learning_rate"},
                  **(variant_flags or {})}
        spec = RunSpec(task, opt, float(lr), int(seed), variant, tuple(to_flags(merged)))
        specs.setdefault(spec.name, spec)


def to_flags(args: dict) -> list[str]:
    """``{"max_length": 128, "lora": True, "x": False}`` -> ``--max_length 128 --lora``."""
    out: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def load_study(path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Study:
    """Reads and checks a study file. Raises StudyConfigError with what is wrong and where."""
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"no study file at {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise StudyConfigError(f"{path}: not valid YAML: {err}") from None
    where = str(path)
    _expect(isinstance(raw, dict), f"{where}: the top level must be a mapping of {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    _expect(not unknown, f"{where}: unknown key(s) {unknown}; the keys are {', '.join(TOP_KEYS)}")
    for key in ("tasks", "optimizers", "seeds"):
        _expect(raw.get(key), f"{where}: '{key}' is required")

    recipe = _resolve_recipe(_expand(raw.get("recipe", "recipes/glue.py"), f"{where}: recipe"), where)
    out = Path(_expand(output_dir if output_dir is not None else raw.get("output_dir", f"runs/study-{path.stem}"),
                       f"{where}: output_dir"))
    launcher = raw.get("launcher", list(DEFAULT_LAUNCHER))
    _expect(isinstance(launcher, list), f"{where}: launcher must be a list of accelerate launch arguments")

    seeds = raw["seeds"]
    _expect(isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds), f"{where}: seeds must be a list of distinct integers, got {seeds!r}")

    args = _recipe_args(raw.get("args"), f"{where}: args")
    tasks = _tasks(raw["tasks"], where)
    optimizers = _optimizers(raw["optimizers"], where)
    lr_sweep = _lr_sweep(raw.get("lr_sweep"), where)
    ablation_opt, variants = _ablation(raw.get("ablation"), where)

    compare = raw.get("compare") or {}
    _expect(isinstance(compare, dict) and set(compare) <= {"candidate", "baseline", "peers", "margin", "same_lr"},
            f"{where}: compare must be a mapping with 'candidate', 'baseline' and optionally 'peers', 'margin', "
            "'same_lr'")
    margin = compare.get("margin", 0.0)
    _expect(isinstance(margin, (int, float)) and not isinstance(margin, bool) and margin >= 0,
            f"{where}: compare.margin must be a number >= 0 (a shortfall that small counts as a match), got {margin!r}")
    in_grid = set(optimizers) | set(lr_sweep)
    candidate = compare.get("candidate", "adaptopt" if "adaptopt" in in_grid else None)
    baseline = compare.get("baseline", "adamw" if "adamw" in in_grid else None)
    peers = compare.get("peers") or []
    _expect(isinstance(peers, list), f"{where}: compare.peers must be a list of optimizer names")
    for role, name in (("candidate", candidate), ("baseline", baseline), *(("peers", n) for n in peers)):
        _expect(name is None or name in in_grid,
                f"{where}: compare.{role} {name!r} is not among the optimizers or the lr_sweep")
    reuse = raw.get("reuse") or []
    _expect(isinstance(reuse, list), f"{where}: reuse must be a list of study folders")
    reuse = [_resolve_dir(_expand(r, f"{where}: reuse")) for r in reuse]

    study = Study(config_path=path, text=text, recipe=recipe, output_dir=out, launcher=[str(a) for a in launcher],
                  seeds=list(seeds), args=args, tasks=tasks, optimizers=optimizers, lr_sweep=lr_sweep,
                  ablation_optimizer=ablation_opt, ablation=variants, candidate=candidate, baseline=baseline,
                  description=str(raw.get("description", "")).strip(), peers=list(peers), reuse=reuse,
                  margin=float(margin), same_lr=bool(compare.get("same_lr", True)))
    if recipe.name == "glue.py":  # a misspelt task would otherwise fail every one of its runs, one by one
        from ..data.glue import GLUE_TASKS

        bad = [t for t in tasks if t not in GLUE_TASKS]
        _expect(not bad, f"{where}: unknown GLUE task(s) {bad}; choose from {', '.join(GLUE_TASKS)}")
    return study


# -- checks of each section -------------------------------------------------------------------------
def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise StudyConfigError(message)


def _expand(value, where: str) -> str:
    value = os.path.expandvars(str(value))
    _expect("$" not in value, f"{where}: {value!r} names an environment variable that is not set")
    return value


def _resolve_dir(path: str) -> Path:
    """A folder named in the study file: relative to the working directory if it exists there, else to the
    repository (as the recipe is), so `studies/results/glue` works from anywhere."""
    return Path(path) if Path(path).exists() or Path(path).is_absolute() else REPO / path


def _resolve_recipe(recipe: str, where: str) -> Path:
    """Relative to the working directory, else to the repository (so `recipes/glue.py` works from anywhere)."""
    for candidate in (Path(recipe), REPO / recipe):
        if candidate.is_file():
            return candidate.resolve()
    raise StudyConfigError(f"{where}: recipe {recipe!r} not found (relative to {Path.cwd()} or {REPO})")


def _recipe_args(args, where: str) -> dict:
    if args is None:
        return {}
    _expect(isinstance(args, dict), f"{where} must be a mapping of recipe flags (key: value)")
    clash = [k for k in args if k in SET_BY_STUDY]
    _expect(not clash, f"{where}: {clash} are set by the study per run (use optimizers: {{name: {{learning_rate: "
                       f"...}}}} for an optimizer's LR, lr_sweep for more LRs, seeds for seeds)")
    for k, v in args.items():  # an unset variable is an error now, not at the first launch; the value keeps ${VAR}
        if isinstance(v, str):
            _expand(v, f"{where}.{k}")
    return dict(args)


def _tasks(raw, where: str) -> dict[str, TaskSpec]:
    if isinstance(raw, list):
        raw = {name: None for name in raw}
    _expect(isinstance(raw, dict), f"{where}: tasks must be a list of names or a mapping name -> {{args, metric}}")
    tasks = {}
    for name, spec in raw.items():
        spec = spec or {}
        _expect(isinstance(spec, dict) and set(spec) <= {"args", "metric"},
                f"{where}: tasks.{name} may hold only 'args' and 'metric', got {spec!r}")
        _expect(bool(_SAFE_NAME.match(str(name))), f"{where}: task name {name!r} must be letters, digits, _ or .")
        tasks[str(name)] = TaskSpec(_recipe_args(spec.get("args"), f"{where}: tasks.{name}.args"), spec.get("metric"))
    return tasks


def _optimizer_name(name, where: str) -> str:
    _expect(name in OPTIMIZERS, f"{where}: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return name


def _positive_float(value, where: str) -> float:
    try:  # YAML 1.1 reads 1e-5 (no dot) as a string: accept it
        number = float(value)
    except (TypeError, ValueError):
        raise StudyConfigError(f"{where}: {value!r} is not a number") from None
    _expect(number > 0, f"{where}: must be > 0, got {value!r}")
    return number


def _optimizers(raw, where: str) -> dict[str, dict]:
    if isinstance(raw, list):
        raw = {name: None for name in raw}
    _expect(isinstance(raw, dict), f"{where}: optimizers must be a list of names or a mapping name -> flags")
    out = {}
    for name, flags in raw.items():
        _optimizer_name(name, f"{where}: optimizers")
        flags = dict(flags or {})
        clash = [k for k in flags if k in SET_BY_STUDY and k != "learning_rate"]
        _expect(not clash, f"{where}: optimizers.{name}: {clash} are set by the study per run")
        if "learning_rate" in flags:
            flags["learning_rate"] = _positive_float(flags["learning_rate"],
                                                     f"{where}: optimizers.{name}.learning_rate")
        out[name] = flags
    return out


def _lr_sweep(raw, where: str) -> dict[str, list[float]]:
    if not raw:
        return {}
    _expect(isinstance(raw, dict), f"{where}: lr_sweep must be a mapping optimizer -> list of learning rates")
    out = {}
    for name, lrs in raw.items():
        _optimizer_name(name, f"{where}: lr_sweep")
        _expect(isinstance(lrs, list) and lrs, f"{where}: lr_sweep.{name} must be a non-empty list")
        out[name] = sorted({_positive_float(lr, f"{where}: lr_sweep.{name}") for lr in lrs})
    return out


def _ablation(raw, where: str) -> tuple[str | None, dict[str, dict]]:
    if not raw:
        return None, {}
    _expect(isinstance(raw, dict) and set(raw) <= {"optimizer", "variants"} and raw.get("variants"),
            f"{where}: ablation must be {{optimizer: NAME, variants: {{variant: {{recipe flags}}}}}}")
    optimizer = _optimizer_name(raw.get("optimizer", "adaptopt"), f"{where}: ablation.optimizer")
    variants = {}
    for name, flags in raw["variants"].items():
        _expect(bool(_SAFE_NAME.match(str(name))) and name != FULL,
                f"{where}: ablation variant {name!r}: use letters, digits, _ or . and not {FULL!r} (the reference)")
        _expect(isinstance(flags, dict) and flags, f"{where}: ablation.variants.{name} must be a mapping of flags")
        variants[str(name)] = _recipe_args(flags, f"{where}: ablation.variants.{name}")
    return optimizer, variants
