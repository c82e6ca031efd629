"""Run configuration: YAML → validated, typed config, with `--set key.path=value` overrides.

Every section forbids unknown keys, so a typo is an error, not a silently ignored setting. Errors
come back as one ConfigError naming the file, the key and what is allowed; the entry points turn
it into a one-line message and exit code 2.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .data.augment import Augment
from .data.integrity import MAX_IMAGE_PIXELS, OnBadImage
from .lowrank.ranks import ENERGY_NEEDS_TRAINED_WEIGHTS, ENERGY_RANGE, POLICIES, SPEEDUP_ABOVE, one_policy


class ConfigError(ValueError):
    """A bad configuration file, key or value (exit code 2, no traceback)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FCLowRankConfig(Section):
    """The fully-connected layers' policy (AlexNet, CaffeNet, VGG-16: fc6 and fc7, every classifier
    layer but the last; W (out×in) ≈ U·V, out·in → K·(in + out)): exactly one of ranks (layer name
    → K, null: dense), speedup (per layer, of MACs and parameters alike) or energy (decomposed mode)."""

    ranks: dict[str, int | None] | None = None
    speedup: float | None = Field(default=None, gt=SPEEDUP_ABOVE)
    energy: float | None = Field(default=None, gt=ENERGY_RANGE[0], le=ENERGY_RANGE[1])

    @model_validator(mode="after")
    def _one_policy(self):
        one_policy({key: getattr(self, key) for key in POLICIES}, POLICIES)
        if self.ranks is not None and any(r is not None and r < 1 for r in self.ranks.values()):
            raise ValueError(f"ranks must be >= 1 (or null for a dense layer), got {self.ranks}")
        return self

    def policy_dict(self) -> dict:
        return {key: getattr(self, key) for key in POLICIES if getattr(self, key) is not None}


class LowRankConfig(Section):
    """How the low-rank model is obtained (mode) and which ranks it has: one conv policy, and
    optionally `fc`, the FC layers' own. With `fc`, the conv policy may be left out (convs dense)."""

    mode: Literal["factorized", "decomposed", "projected"] = "factorized"
    preset: str | None = None  # a named rank list of the model, e.g. tai2016
    ranks: list[int | None] | dict[str, int | None] | None = None
    speedup: float | None = Field(default=None, gt=SPEEDUP_ABOVE)
    energy: float | None = Field(default=None, gt=ENERGY_RANGE[0], le=ENERGY_RANGE[1])
    factorize_first: bool | None = None
    bn_between: bool = False
    dense_checkpoint: Path | None = None  # decomposed mode: the trained dense model to start from
    project_every: int = Field(default=100, ge=1)  # projected mode: optimizer steps between projections
    fc: FCLowRankConfig | None = None  # fc6/fc7 factorized too; None: dense (unless the preset has FC ranks)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, tree: Any) -> Any:
        if isinstance(tree, dict) and "execution" in tree:
            raise ValueError("model.lowrank.execution has moved to precision.execution (how layers run is not"
                             " what the model is); move the line there")
        return tree

    @model_validator(mode="after")
    def _one_policy(self):
        keys = ("preset", *POLICIES)
        given = {key: getattr(self, key) for key in keys}
        if self.fc is None and all(value is None for value in given.values()):
            raise ValueError(f"give exactly one of {', '.join(keys)} (or only fc, to factorize fc6/fc7 and keep the"
                             " convs dense)")
        if self.fc is None or any(value is not None for value in given.values()):
            one_policy(given, keys)  # with fc alone the convs stay dense
        if self.energy is not None and self.mode != "decomposed":
            # factorized: V and H are random; projected: the ranks are fixed before the first projection
            raise ValueError(ENERGY_NEEDS_TRAINED_WEIGHTS.format(key="energy", mode=self.mode))
        if self.fc is not None and self.fc.energy is not None and self.mode != "decomposed":
            raise ValueError(ENERGY_NEEDS_TRAINED_WEIGHTS.format(key="fc.energy", mode=self.mode))
        if self.mode == "decomposed" and self.dense_checkpoint is None:
            raise ValueError("mode 'decomposed' needs dense_checkpoint: the trained dense model to decompose")
        if isinstance(self.ranks, list) and any(r is not None and r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be >= 1 (or null for a dense layer), got {self.ranks}")
        if isinstance(self.ranks, dict) and any(r is not None and r < 1 for r in self.ranks.values()):
            raise ValueError(f"ranks must be >= 1 (or null for a dense layer), got {self.ranks}")
        return self

    def policy_dict(self) -> dict:
        """The `lowrank` dict that models.build_model accepts (policy only, no training mode)."""
        keys = ("preset", *POLICIES, "factorize_first")
        policy = {k: getattr(self, k) for k in keys if getattr(self, k) is not None} | {"bn_between": self.bn_between}
        return policy | ({"fc": self.fc.policy_dict()} if self.fc is not None else {})


class ModelConfig(Section):
    name: str
    num_classes: int | None = Field(default=None, ge=2)  # default: the data set's class count
    batch_norm: bool | None = None
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    aux_logits: bool | None = None  # GoogLeNet only
    fc_batch_norm: bool | None = None  # VGG-16 only: BN after fc6 and fc7 (the authors' VGG-16-BN)
    lowrank: LowRankConfig | None = None  # None: the dense baseline

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from .models import model_spec

        model_spec(name)  # a ValueError naming the models there are
        return name

    @model_validator(mode="after")
    def _fc_layers(self):
        """model.lowrank.fc names layers this model has (fc6, fc7), and only on a model that has them."""
        fc = self.lowrank.fc if self.lowrank is not None else None
        if fc is not None:
            from .models import check_fc_names, fc_policy, model_spec

            check_fc_names(self.name, fc.ranks or {})
            fc_policy(model_spec(self.name), self.lowrank.policy_dict())  # not with a preset that has FC ranks
        return self

    def build_dict(self, num_classes: int | None = None) -> dict:
        """The plain dict models.build_model accepts; `num_classes` fills in an unset class count."""
        cfg: dict[str, Any] = {"name": self.name}
        for key in ("num_classes", "batch_norm", "dropout", "aux_logits", "fc_batch_norm"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        if "num_classes" not in cfg and num_classes is not None:
            cfg["num_classes"] = num_classes
        if self.lowrank is not None:
            cfg["lowrank"] = self.lowrank.policy_dict()
        return cfg


class DataConfig(Section):
    root: Path
    backend: Literal["auto", "dali", "torchvision"] = "auto"
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"
    batch_size: int = Field(default=256, ge=1)  # per process (GPU)
    image_size: int = Field(default=224, ge=8)
    val_resize: int | None = Field(default=None, ge=8)
    workers: int = Field(default=4, ge=0)
    min_crop_scale: float = Field(default=0.08, gt=0.0, le=1.0)  # random-resized-crop area range (s, 1)
    hflip: bool = True  # random horizontal flips in training
    # what data.root holds: an ImageNet-style folder (or file lists), or CIFAR-10's binary batches
    format: Literal["imagenet", "cifar10"] = "imagenet"
    # train crop and input scaling: "inception" (random resized crop; the default for ImageNet),
    # "caffe" (the authors': shorter side 256, random image_size square, mirror, mean subtraction; val
    # resize 256), "none" (the val crop; the default, and the only choice, for CIFAR-10)
    augment: Augment | None = None
    on_bad_image: OnBadImage = "error"  # undecodable image: stop naming it, or replace and count it
    # an image whose header declares more pixels is bad, never decoded (a decompression bomb); PIL's limit
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, ge=1)
    train_list: Path | None = None
    val_list: Path | None = None

    @model_validator(mode="after")
    def _paths_exist(self, info: ValidationInfo):
        if not (info.context or {}).get("check_paths", True):
            return self
        if not self.root.is_dir():
            raise ValueError(f"data folder {str(self.root)!r} does not exist")
        for key in ("train_list", "val_list"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ValueError(f"{key}: file {str(path)!r} does not exist")
        return self


class OptimConfig(Section):
    epochs: int = Field(default=90, ge=1)
    lr: float = Field(default=0.1, gt=0.0)
    # "linear" (Goyal et al. 2017): the lr used is lr × global batch / lr_batch, the global batch being
    # batch_size × processes × accumulate, so one recipe serves 1 GPU or 32 (the ImageNet configs);
    # "none": lr as given, whatever the global batch (min_lr scales with lr either way).
    lr_scaling: Literal["none", "linear"] = "none"
    lr_batch: int = Field(default=256, ge=1)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=1e-4, ge=0.0)  # not applied to BN parameters and biases
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "step", "linear_step"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    # step schedule: lr × gamma at each milestone (epochs; fractions allowed, so Caffe's iteration
    # counts convert exactly), or, with step_every, at every multiple of step_every epochs (Caffe's
    # "step" policy with stepsize = step_every × iterations per epoch); never below min_lr.
    # linear_step: lr × (1 − gamma·n) after n multiples of step_every, never below min_lr (our
    # reading of the authors' "stepdecr"; see optim.lr_factor)
    milestones: list[float] = Field(default_factory=lambda: [30, 60, 80])
    step_every: float | None = Field(default=None, gt=0.0)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    min_lr: float = Field(default=0.0, ge=0.0)  # floor of the cosine and step schedules
    accumulate: int = Field(default=1, ge=1)  # micro-batches per optimizer step
    # A non-finite loss stops the run (0), or skips the update of its optimizer step on every rank
    # (weights, optimizer state and BN statistics unchanged), up to this many times in the whole run.
    skip_nonfinite_steps: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _schedule(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be shorter than epochs ({self.epochs})")
        if self.schedule == "linear_step" and self.step_every is None:
            raise ValueError("schedule 'linear_step' needs step_every (epochs between decrements)")
        if sorted(self.milestones) != self.milestones or any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing epochs > 0, got {self.milestones}")
        return self


class PrecisionConfig(Section):
    """How the model runs — none of it changes the model or its checkpoints."""

    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False
    # How each factorized layer runs — the same parameters and function either way: as its two thin
    # convs, as one dense conv of its composed kernel, or whichever is measured faster per layer at
    # start-up (speed/execution.py). A checkpoint resumes under any of them.
    # null: auto on a GPU, factorized on the CPU (measured slower composed there, see CPU_DEFAULT).
    execution: Literal["auto", "factorized", "composed"] | None = None


class PowerSGDConfig(Section):
    """PowerSGD (Vogels et al. 2019) through torch's DDP hook: each gradient matrix all-reduced as two
    rank-`rank` factors. Defaults are torch's (PowerSGDState), but for start_iter."""

    rank: int = Field(default=1, ge=1)  # matrix_approximation_rank: lower sends less
    # plain all-reduce for the first start_iter optimizer steps; null: the end of lr warm-up
    # (optim.warmup_epochs), and at least 2 (DDP rebuilds its buckets after the first step)
    start_iter: int | None = Field(default=None, ge=1)
    error_feedback: bool = True  # add what compression left out to the next step's gradient (per rank)
    warm_start: bool = True  # start each step's power iteration from the last step's Q factors
    min_compression_rate: float = Field(default=2.0, gt=0.0)  # smaller gradients are sent as they are

    @model_validator(mode="after")
    def _torch_rule(self):
        if self.start_iter is not None and self.start_iter < 2 and (self.error_feedback or self.warm_start):
            raise ValueError(f"start_iter must be >= 2 with error_feedback or warm_start (got {self.start_iter}):"
                             " DDP rebuilds its buckets after the first step")
        return self


class DistributedConfig(Section):
    """How several processes train one model. One process ignores all of it but `engine`'s checks."""

    engine: Literal["ddp", "deepspeed"] = "ddp"
    sync_batchnorm: bool = False  # BN statistics over the global batch instead of each rank's
    zero_stage: int = Field(default=1, ge=0, le=2)  # deepspeed: ZeRO stage (optimizer/gradient sharding)
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # merged over the generated DeepSpeed config
    timeout_s: float = Field(default=600.0, gt=0.0)  # a collective waiting longer (a dead rank) fails
    # DDP: gradients are all-reduced in buckets of this many MB while backward goes on (torch's default 25)
    bucket_cap_mb: float = Field(default=25.0, gt=0.0)
    # DDP: "bf16" all-reduces the gradients in bfloat16 (half the bytes between nodes) and averages
    # them back in float32 — this changes the numerics (each gradient is rounded to 8 bits of mantissa)
    # "powersgd": rank-r factors of each gradient matrix (distributed.powersgd), with error feedback
    grad_compression: Literal["none", "bf16", "powersgd"] = "none"
    powersgd: PowerSGDConfig | None = None  # with grad_compression powersgd; null: the defaults
    # DDP: the autograd graph is the same every step (true of our models), so DDP can skip its
    # per-step search for unused parameters and overlap more; not with optim.accumulate > 1 (torch's
    # reducer fails under no_sync with a static graph), where it is left off
    static_graph: bool = True

    @field_validator("engine")
    @classmethod
    def _installed(cls, engine: str) -> str:
        if engine == "deepspeed":
            import importlib.util

            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError("'deepspeed' is not installed here (pip install 'lowrank-dist[deepspeed]'); use 'ddp'")
        return engine


RUN_NAME_MAX = 100  # characters; file systems take 255 bytes, and run names end up in longer names


class RunConfig(Section):
    name: str | None = None  # default: the config file's stem
    out_dir: Path = Path("runs")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = Field(default=1, ge=1)  # epochs
    checkpoint_every: int = Field(default=0, ge=0)  # optimizer steps; 0: at the end of each epoch only
    keep_last: int = Field(default=3, ge=1)  # step checkpoints kept, besides the best
    log_every: int = Field(default=20, ge=1)  # optimizer steps
    # Optimizer steps between checks for a stop request (SLURM's USR2/TERM; also at every log point).
    # 10 steps take ≤ 20 s at the slowest step of our recipes (VGG-16, batch 256, fp32 on an older
    # GPU, ~2 s), leaving ≥ 100 s of SLURM's 120 s warning for the checkpoint and exit.
    stop_check_every: int = Field(default=10, ge=1)
    max_steps: int | None = Field(default=None, ge=1)  # stop early (debugging, tests)
    speed_report: bool = True  # low-rank runs: time each layer against its dense twin at the end

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        """A folder name every file system, shell and SLURM job name takes as it is."""
        if name is None:
            return name
        if len(name) > RUN_NAME_MAX:
            raise ValueError(f"run name {name[:40]!r}… has {len(name)} characters; at most {RUN_NAME_MAX}")
        if (not name or "/" in name or "\\" in name or name.startswith((".", "-")) or name != name.strip()
                or not name.isprintable()):
            raise ValueError(f"run name {name!r} must be a plain folder name: printable characters, no / or \\, not"
                             " starting with . or -, no spaces at either end")
        return name

    @property
    def folder(self) -> Path:
        return self.out_dir / self.name


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _composed_needs_one_kernel(self):
        lowrank = self.model.lowrank
        if self.precision.execution == "composed" and lowrank is not None and lowrank.bn_between:
            raise ValueError("precision.execution 'composed' is impossible with model.lowrank.bn_between: BatchNorm"
                             " between V and H normalises the intermediate by batch statistics, so the pair is not one"
                             " kernel; use 'auto' or 'factorized'")
        return self

    @model_validator(mode="after")
    def _what_deepspeed_cannot_do(self):
        if self.distributed.engine != "deepspeed":
            return self
        if self.optim.skip_nonfinite_steps and self.optim.accumulate > 1:
            raise ValueError("optim.skip_nonfinite_steps with distributed.engine 'deepspeed' needs optim.accumulate 1"
                             " (DeepSpeed keeps the gradients already accumulated for the step); use engine 'ddp'")
        if self.model.lowrank is not None and self.model.lowrank.mode == "projected":
            raise ValueError("model.lowrank.mode 'projected' needs distributed.engine 'ddp': DeepSpeed keeps its own"
                             " fp32 copy of the weights, which a projection of the model's kernels would not reach")
        if self.precision.compile:
            raise ValueError("precision.compile: not supported with distributed.engine 'deepspeed' (use 'ddp')")
        if self.distributed.grad_compression != "none":
            raise ValueError(f"distributed.grad_compression {self.distributed.grad_compression!r} is a DDP comm hook;"
                             " DeepSpeed reduces gradients itself: use engine 'ddp', or grad_compression 'none'")
        return self

    @model_validator(mode="after")
    def _powersgd_section(self):
        options = self.distributed
        if options.powersgd is not None and options.grad_compression != "powersgd":
            raise ValueError(f"distributed.powersgd is set but distributed.grad_compression is"
                             f" {options.grad_compression!r}: set it to 'powersgd', or remove the powersgd section")
        if options.grad_compression == "powersgd" and options.powersgd is None:
            options.powersgd = PowerSGDConfig()
        return self

    def resolved(self) -> dict:
        """Plain, YAML-safe dict of every setting (defaults included): what the run really used."""
        return self.model_dump(mode="json")


@contextmanager
def config_errors(key: str | None = None) -> Iterator[None]:
    """Inside, a plain ValueError — a value this machine or this model cannot take, found only once
    the run is being set up — becomes a ConfigError (one line, exit 2), prefixed with `key` unless
    its message names a setting of that section already. Our own errors (ConfigError, CheckpointError,
    DataError: ValueError subclasses) pass through as they are: they say what they are about."""
    try:
        yield
    except ValueError as error:
        if type(error) is not ValueError:
            raise
        message = str(error)
        if key is not None and not message.startswith(key.split(".")[0]):
            message = f"{key}: {message}"
        raise ConfigError(message) from None


def apply_override(tree: dict, assignment: str) -> None:
    """`optim.lr=0.05` → tree["optim"]["lr"] = 0.05 (the value is parsed as YAML: numbers, booleans,
    lists and null come out typed)."""
    path, sep, text = assignment.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. optim.lr=0.05")
    keys = path.strip().split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[:depth + 1])} is not a section")
        node = child
    try:
        node[keys[-1]] = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({_yaml_problem(error)})") from None


class _PlainYaml(yaml.SafeLoader):
    """YAML without aliases (`*name`): a config never needs them, and aliases of aliases expand
    exponentially (the "billion laughs": a few hundred bytes that take gigabytes once loaded)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"found the alias *{event.anchor}, which configs do not"
                                              " accept (write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """YAML as safe_load reads it, aliases refused (yaml.YAMLError)."""
    return yaml.load(text, Loader=_PlainYaml)  # noqa: S506 - a SafeLoader


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what is wrong, and where."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            section = item["loc"][:-1]
            message = f"unknown key; allowed here: {', '.join(_allowed_keys(section))}"
        elif item["type"] not in ("value_error", "missing") and "input" in item:
            message += f" (got {item['input']!r})"
        lines.append(f"{where}: {message}" if where else message)  # a check across sections names its keys
    return f"{source}: " + "; ".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    section: type[BaseModel] = Config
    for part in loc:
        field = section.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            break
        section = nested[0]
    return sorted(section.model_fields)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True) -> Config:
    """Read, override and validate a YAML config. Relative data paths are taken from the current
    directory (where the user runs the command), like any command-line path. `check_paths=False`
    skips checking that data paths exist (for commands that never read the data, like reports)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start});"
                          " save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({error.strerror or error})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, data, optim, precision)")
    tree.setdefault("run", {})
    if isinstance(tree["run"], dict):
        tree["run"].setdefault("name", path.stem)
    return config_from_dict(tree, str(path), overrides, check_paths)


def config_from_dict(tree: dict, source: str, overrides: list[str] | tuple[str, ...] = (),
                     check_paths: bool = True) -> Config:
    """Override and validate a config held as a dict (e.g. the one a checkpoint carries); errors
    name `source`."""
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Config.model_validate(tree, context={"check_paths": check_paths})
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None
