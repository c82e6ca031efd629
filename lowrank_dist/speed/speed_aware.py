"""Speed-aware ranks: factorize a layer only where the factorized form is measured faster here.

A base rank policy (the authors' ranks, a theoretical speedup target, ...) proposes layers and a
rank K0 for each; `search` adds more candidates, the rank K_s = TargetSpeedup(s) for each listed
theoretical speedup s. Each candidate is timed against the dense layer on this device, dtype,
batch and input shape (forward+backward by default: the ranks are for training), and the layer
gets the largest candidate K with

    measured speedup = t_dense / t_K  > 1   and   >= target

(the largest, because a higher rank keeps more of the dense layer's capacity), or stays dense if
none qualifies. Layers the base policy keeps dense are not timed. The result is an explicit rank
table (module path → K, or None for dense) that `models.build_model` takes as
`lowrank: {ranks: {...}}`, with a reason per layer, written into a YAML config by `to_yaml`; the
markdown table and the YAML comments give each layer's paper name.

The timing function is a parameter (`timer`) so that the decision rule can be tested with made-up
timings; `device_timer` is the real one.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ..lowrank.ranks import POLICIES, SPEEDUP_ABOVE, ExplicitRanks, RankPolicy, TargetSpeedup
from ..lowrank.layers import LowRankConv2d
from ..models import choose_ranks, factorizable_convs, layer_names
from ..runtime import check_dtype, dtype_name, select_device
from .costs import conv_costs
from .timing import LayerInput, capture_inputs, device_description, layer_functions, measure


@dataclass
class LayerCase:
    """What a timer is asked to time: a dense conv and its factorized candidates on one input."""

    name: str
    dense: nn.Conv2d
    lowrank: dict[int, LowRankConv2d]  # candidate rank K → a factorized twin at that rank
    given: LayerInput


# timer(case) → (dense seconds, {K: low-rank seconds})
LayerTimer = Callable[[LayerCase], "tuple[float, dict[int, float]]"]


def device_timer(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    objective: str = "train",
    repeats: int = 10,
    warmup: int = 3,
    min_sample_s: float = 1e-3,
    channels_last: bool = False,
) -> LayerTimer:
    """The real timer: the dense layer and every candidate timed together (speed.timing.measure,
    in turn and alternated), forward+backward (`objective="train"`) or forward only ("forward")."""
    if objective not in ("train", "forward"):
        raise ValueError(f"objective must be 'train' or 'forward', got {objective!r}")
    device = torch.device(device)
    pick = 1 if objective == "train" else 0

    def timer(case: LayerCase) -> tuple[float, dict[int, float]]:
        fns = {"dense": layer_functions(case.dense, case.given, device, dtype, channels_last)[pick]}
        for rank, layer in case.lowrank.items():
            fns[f"K={rank}"] = layer_functions(layer, case.given, device, dtype, channels_last)[pick]
        timings = measure(fns, device, repeats=repeats, warmup=warmup, min_sample_s=min_sample_s)
        return timings["dense"].median, {rank: timings[f"K={rank}"].median for rank in case.lowrank}

    return timer


@dataclass
class RankChoice:
    module: str  # the module path (features.2): the key of the rank table
    layer: str  # the paper's name (conv1_2; models/layer_names.py): what the table shows
    kernel: tuple[int, int, int, int]
    rank: int | None  # chosen; None: dense
    reason: str
    dense_s: float | None = None  # None: not timed (the base policy keeps the layer dense)
    lowrank_s: dict[int, float] = field(default_factory=dict)  # candidate K → seconds
    theoretical: dict[int, float] = field(default_factory=dict)  # candidate K → MAC ratio

    def measured(self, rank: int) -> float:
        return self.dense_s / self.lowrank_s[rank]

    def as_dict(self) -> dict:
        return {
            "layer": self.layer, "module": self.module, "kernel": list(self.kernel), "rank": self.rank, "reason": self.reason,
            "dense_s": self.dense_s,
            "candidates": [
                {"rank": k, "lowrank_s": s, "measured_speedup": self.measured(k), "theoretical_speedup": self.theoretical[k]}
                for k, s in self.lowrank_s.items()
            ],
        }


@dataclass
class SpeedAwareRanks:
    meta: dict  # model, device, dtype, batch, input, objective, target, date
    choices: list[RankChoice]

    @property
    def ranks(self) -> dict[str, int | None]:
        """Every factorizable conv's module path → its rank, None where it stays dense."""
        return {choice.module: choice.rank for choice in self.choices}

    def policy(self) -> RankPolicy:
        """The choice as a rank policy for models.convert / choose_ranks."""
        return ExplicitRanks(self.ranks)

    def as_dict(self) -> dict:
        return {"meta": self.meta, "ranks": self.ranks, "layers": [c.as_dict() for c in self.choices]}

    def to_markdown(self) -> str:
        meta = self.meta
        kept = sum(c.rank is not None for c in self.choices)
        lines = [
            f"### Speed-aware ranks for {meta['model']} on {meta['device_name']} ({meta['dtype']}, input"
            f" {'×'.join(map(str, meta['input_shape']))}, {meta['objective']}, target ≥ {meta['target']:g}×"
            f" and faster than dense): {kept} of {len(self.choices)} layers factorized",
            "",
            "| layer | kernel | rank | why |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c.layer} | {'×'.join(map(str, c.kernel))} | {c.rank if c.rank is not None else 'dense'} | {c.reason} |"
            for c in self.choices
        ]
        return "\n".join(lines)

    def to_yaml(self, model: Mapping, base: Mapping | None = None, fc: Mapping | None = None) -> str:
        """A YAML config whose model.lowrank is this rank table keyed by module path, one comment
        per layer with its paper name and why.

        `model` is the build dict of the model (name, batch_norm, ...); `base`, if given, is a whole
        config tree (a parsed config file) to copy everything else from: its lowrank mode and
        options stay, its rank policy is replaced, and a run.name it sets is dropped so that the
        new config does not resume the old run's checkpoints. `fc`, if given, is the FC layers'
        policy (models.fc_policy), written as model.lowrank.fc: the speed-aware search picks conv
        ranks only, and a preset it replaces may have carried FC ranks."""
        import yaml

        tree = copy.deepcopy(dict(base)) if base is not None else {}
        model_section = dict(tree.get("model") or {}) or {k: v for k, v in model.items() if k != "lowrank"}
        lowrank = {k: v for k, v in dict(model_section.get("lowrank") or model.get("lowrank") or {}).items()
                   if k not in ("preset", *POLICIES, "factorize_first")}
        model_section["lowrank"] = lowrank | {"ranks": self.ranks} | ({"fc": dict(fc)} if fc else {})
        tree["model"] = model_section
        if isinstance(tree.get("run"), dict):
            tree["run"].pop("name", None)
        text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
        reasons = {c.module: f"{c.layer}: {c.reason}" if c.layer != c.module else c.reason for c in self.choices}
        lines, in_ranks = [], False
        for line in text.splitlines():  # model: / lowrank: / ranks: / one `name: K` line per layer
            if in_ranks and line.startswith("      "):
                (name,) = yaml.safe_load(line)
                line = f"{line}  # {reasons[name]}"
            else:
                in_ranks = line == "    ranks:"
            lines.append(line)
        meta = self.meta
        header = [
            f"# Speed-aware ranks for {meta['model']}: a layer is factorized only where it measured faster than",
            f"# dense on {meta['device_name']} ({meta['dtype']}, input {'×'.join(map(str, meta['input_shape']))},"
            f" {meta['objective']}, target {meta['target']:g}×, {meta['date']}). null: dense.",
        ]
        result = "\n".join(header + lines) + "\n"
        if yaml.safe_load(result) != tree:  # the comments must not have changed the data
            raise AssertionError("speed-aware YAML did not round-trip")
        return result


def _candidates(conv: nn.Conv2d, base_rank: int, search: Sequence[float]) -> list[int]:
    """K0 and the rank of every searched theoretical speedup, largest first, without repeats."""
    ranks = {base_rank} | {TargetSpeedup(s).rank_for("", conv.weight, conv.groups) for s in search}
    return sorted(ranks, reverse=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _decide(choice: RankChoice, target: float) -> tuple[int | None, str]:
    measured = "; ".join(
        f"K={k} {_ms(choice.lowrank_s[k])} ({choice.measured(k):.2f}×, theory {choice.theoretical[k]:.2f}×)"
        for k in choice.lowrank_s
    )
    good = [k for k in choice.lowrank_s if choice.measured(k) > 1.0 and choice.measured(k) >= target]
    text = f"dense {_ms(choice.dense_s)}; {measured} → "
    if not good:
        needed = "faster than dense" if target <= 1.0 else f"≥ {target:g}× faster"
        return None, text + f"dense: no candidate is {needed}"
    rank = max(good)
    if len(choice.lowrank_s) == 1:
        return rank, text + "factorize: faster than dense" + (f" and ≥ {target:g}×" if target > 1.0 else "")
    return rank, text + f"K={rank}: the largest rank " + ("faster than dense" if target <= 1.0 else f"≥ {target:g}×")


def speed_aware_ranks(
    dense_model: nn.Module,
    input_shape: tuple[int, int, int, int],
    base: RankPolicy | Mapping,
    search: Sequence[float] = (),
    target: float = 1.0,
    factorize_first: bool | None = None,
    bn_between: bool = False,
    timer: LayerTimer | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    objective: str = "train",
    repeats: int = 10,
    warmup: int = 3,
    min_sample_s: float = 1e-3,
    channels_last: bool = False,
    model_name: str | None = None,
) -> SpeedAwareRanks:
    """Choose per-layer ranks for `dense_model` by measured speed at `input_shape` = (B, C, H, W).

    `base` is a rank policy or its dict ({"ranks": ...}, {"speedup": s}, {"energy": f}; resolve a
    preset with models.lowrank_policy first); `search` lists extra theoretical speedups whose
    ranks are tried too; `timer` defaults to `device_timer(device, dtype, objective, ...)`."""
    check_dtype(dtype)
    if any(not s > SPEEDUP_ABOVE for s in search):
        raise ValueError(f"searched speedups must be > {SPEEDUP_ABOVE:g}, got {list(search)}")
    device = select_device(device, key="device")
    timer = timer or device_timer(device, dtype, objective, repeats, warmup, min_sample_s, channels_last)
    model = copy.deepcopy(dense_model).to(device)
    proposed = choose_ranks(model, base, factorize_first)
    inputs = capture_inputs(model, torch.randn(tuple(input_shape), device=device))
    names = layer_names(model)
    choices = []
    for name, conv in factorizable_convs(model):
        kernel = tuple(conv.weight.shape)
        if name not in proposed or name not in inputs:
            why = "the base policy keeps it dense" if name not in proposed else "not on the forward path"
            choices.append(RankChoice(name, names[name], kernel, None, f"dense: {why} (not timed)"))
            continue
        ranks = _candidates(conv, proposed[name], search)
        case = LayerCase(name, conv, {k: LowRankConv2d.from_scratch_like(conv, k, bn_between) for k in ranks}, inputs[name])
        dense_s, lowrank_s = timer(case)
        if not dense_s > 0 or any(not s > 0 for s in lowrank_s.values()) or set(lowrank_s) != set(ranks):
            raise ValueError(f"timer returned unusable times for {name}: dense {dense_s}, low-rank {lowrank_s}")
        # exact MACs on this input (conv_costs), so strided layers agree with the speed report
        theoretical = {k: conv_costs(layer, inputs[name].shape[1:])[0].speedup for k, layer in case.lowrank.items()}
        choice = RankChoice(name, names[name], kernel, None, "", dense_s, {k: lowrank_s[k] for k in ranks}, theoretical)
        choice.rank, choice.reason = _decide(choice, target)
        choices.append(choice)
    meta = {
        "model": model_name or type(dense_model).__name__,
        "device": str(device),
        "device_name": device_description(device),
        "dtype": dtype_name(dtype),
        "channels_last": channels_last,
        "input_shape": [int(s) for s in input_shape],
        "objective": objective,
        "target": target,
        "search": list(search),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    return SpeedAwareRanks(meta, choices)
